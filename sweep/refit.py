"""Refit (`run --refit`): after the rule has chosen, the winner's configuration trained again on train
+ validation, and that model is the one `best --export` writes out.

scikit-learn's `refit=True` is the anchor: the search chooses a configuration on validation, and the
model that ships is that configuration fitted on every labelled image. With no validation left to
choose an epoch by, it trains for the chosen trial's best epoch count, with no early stopping. The
record stays the chosen trial's (its val_acc, gap and rank do not move): the refit is not an Optuna
trial but an MLflow run of its own under the study's parent run (tag `sweep.role=refit`,
`sweep.refit_of=<the chosen run's id>`), named `<trial>-refit`, with its checkpoint, whose
provenance says `trained_on: train + validation`. A stage-2 winner is refit from the same stage-1
head it was fine-tuned from.
"""

from __future__ import annotations

import time
from dataclasses import replace

from torch import nn

from sweep.config import FinetuneConfig, TrainConfig
from sweep.finetune import FinetuneTrial
from sweep.objective import HeadTrial
from sweep.ranking import rank
from sweep.select import HEAD_STAGE, TrialRecord
from sweep.session import Session
from sweep.summary import TRAINED_ON
from sweep.trial import BestEpoch, log_checkpoint, weights_copy


def refit_name(chosen: TrialRecord) -> str:
    return f"{chosen.name}-refit"


def refit_task(session: Session, chosen: TrialRecord, records: list[TrialRecord]) -> tuple[object, object]:
    """(the trial task, its configuration) that trains `chosen`'s configuration for its best epoch
    count on the session's data."""
    head = session.tracker.fetch_checkpoint(chosen)
    train = TrainConfig(**{**head["train_config"], "epochs": chosen.best_epoch})
    if chosen.stage == HEAD_STAGE:
        return HeadTrial(session), train
    params = chosen.params
    source = next(r for r in records if r.stage == HEAD_STAGE and r.number == chosen.source_trial)
    config = FinetuneConfig(
        source_trial=source.number,
        blocks=params["finetune_blocks"],
        train=train,
        average=params.get("average", "none"),
        schedule=params.get("schedule", "constant"),
        train_precision=params.get("train_precision", "fp32"),
        patience=0,  # validation is in the training set: nothing to stop on
        lr_decay=params.get("lr_decay", 1.0),
    )
    return FinetuneTrial(session, source, session.tracker.fetch_checkpoint(source)), config


def run_refit(session: Session, chosen: TrialRecord | None = None) -> str | None:
    """Refit the winner, or `chosen` (once: a re-run finds its FINISHED refit and says so); the refit's
    run id."""
    ranking = rank(session.studies, session.cfg.tolerance)
    chosen, report, tracker = chosen or ranking.winner, session.report, session.tracker
    if chosen is None:
        report("refit skipped: no COMPLETE trial to refit")
        return None
    done = tracker.find_refit(session.parent.experiment_id, chosen)
    if done is not None:
        report(f"refit: {chosen.name} was already refit on {TRAINED_ON}")
        return done
    data = session.data
    joined = replace(session, data=replace(data, train=data.train.joined(data.val)))
    task, config = refit_task(joined, chosen, ranking.records)
    sizes = f"{len(data.train.labels)} + {len(data.val.labels)} images"
    report(f"refit: {chosen.name}'s configuration on {TRAINED_ON} ({sizes}), {chosen.best_epoch} epoch(s)")
    name = refit_name(chosen)
    params = {**task.params(config), "refit_of": chosen.name, "trained_on": TRAINED_ON}
    params["train_images"] = len(joined.data.train.labels)
    run_id = tracker.start_refit(session.parent, name, params, chosen)
    last = BestEpoch()

    def on_epoch(epoch: int, metrics: dict, model: nn.Module) -> None:
        # Validation is in the training set, so only the training curves mean anything.
        kept = {k: metrics[k] for k in ("train_loss", "train_acc", "running_train_loss", "running_train_acc")}
        tracker.log_epoch(run_id, kept, step=epoch)
        last.metrics = {"epoch": epoch, **kept}  # the last epoch's weights are the refit model
        last.state_dict = weights_copy(model)

    start = time.perf_counter()
    try:
        task.train(config, on_epoch)
        provenance = {
            "study": session.cfg.study,
            "trial": name,
            "stage": chosen.stage,
            "mlflow_run_id": run_id,
            "refit_of": chosen.name,
            "trained_on": TRAINED_ON,
        }
        log_checkpoint(tracker, run_id, task.checkpoint(config, last, **provenance))
        tracker.log_metrics(
            run_id, {"refit/epochs": last.metrics["epoch"], "refit/train_acc": last.metrics["train_acc"]}
        )
    except BaseException as exc:
        tracker.end_trial(run_id, "FAIL", f"{type(exc).__name__}: {exc}")
        raise
    tracker.end_trial(run_id, "COMPLETE")
    report(f"refit: {name} done in {time.perf_counter() - start:.0f} s")
    return run_id
