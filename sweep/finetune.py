"""Stage 2: fine-tune the stage-1 winner's last K inverted-residual blocks, on cached activations.

The course's recipe: first train the head on the frozen base, then unfreeze the top of the base and go
on with a small learning rate. The winner's head is the starting point; the blocks after the cut (and
their BatchNorm layers) train with it, on the activations cached at the cut, one view per image per
epoch, so the frozen part of the trunk never runs again.

The result is one more nested MLflow run (tag stage=finetune, named after the trial it starts from)
and one more Optuna trial, added once it has finished, with the winner's parameters and
user_attrs stage=finetune: `best` and `trials` weigh it under the same rule as every sweep trial,
and it does not count towards the sweep's target number of trials.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict

import optuna
import torch
from torch import nn

from clothing.features import FeatureBatches
from clothing.model import ClothingClassifierMobileNet, load_backbone, trainable_parameters
from clothing.train import TrainingDiverged, set_seed, train_and_evaluate
from sweep.config import SweepConfig, TrainConfig
from sweep.data import SweepData
from sweep.export import fetch_head
from sweep.objective import best_attrs, checkpoint_payload, log_best, track_epoch
from sweep.select import TrialRecord, select_winner
from sweep.tracking import Tracker

HEAD_STAGE, FINETUNE_STAGE = "head", "finetune"
TRUNK_PREFIX, HEAD_PREFIX = "0.", "2."  # keys of the tail module: Sequential(features[cut:], pool, head)


def finetune_source(records: list[TrialRecord]) -> TrialRecord | None:
    """The trial stage 2 starts from: the winner among the sweep (stage-1) trials."""
    return select_winner([r for r in records if r.stage == HEAD_STAGE])


def already_finetuned(study: optuna.Study, source: TrialRecord, blocks: int) -> bool:
    return any(
        t.user_attrs.get("stage") == FINETUNE_STAGE
        and t.user_attrs.get("source_trial") == source.number
        and t.user_attrs.get("finetune_blocks") == blocks
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    )


def finetune_winner(
    cfg: SweepConfig,
    data: SweepData,
    study: optuna.Study,
    records: list[TrialRecord],
    tracker: Tracker,
    experiment_id: str,
    parent_id: str,
    device: torch.device,
    report: Callable[[str], None],
) -> None:
    """Fine-tune the sweep's winner once per (winner, K); a finished one is not repeated on resume."""
    source = finetune_source(records)
    if source is None:
        report("stage 2 skipped: no COMPLETE sweep trial to fine-tune")
        return
    blocks = cfg.finetune_blocks
    if already_finetuned(study, source, blocks):
        report(f"stage 2: trial {source.number} was already fine-tuned with {blocks} block(s)")
        return
    head = fetch_head(tracker, source)
    train_cfg = TrainConfig(**{**head["config"], "epochs": cfg.finetune_epochs, "lr": cfg.finetune_lr})
    params = {
        **asdict(train_cfg),
        "source_trial": source.number,
        "finetune_blocks": blocks,
        "views": data.train.views,
        "backbone": data.backbone_id,
    }
    run_id = tracker.start_trial(experiment_id, parent_id, cfg.study, None, params, stage=FINETUNE_STAGE)
    report(f"stage 2: fine-tuning trial {source.number} with its last {blocks} block(s), lr {cfg.finetune_lr:.1e}")
    best: dict = {}
    try:
        _train(cfg, data, head, train_cfg, tracker, run_id, best, device, report)
    except TrainingDiverged as exc:
        tracker.end_trial(run_id, "PRUNED", {"sweep.stop_reason": f"diverged: {exc}"})
        report(f"stage 2 stopped: the loss diverged ({exc}); try a smaller --finetune-lr")
        return
    except BaseException as exc:
        tracker.end_trial(run_id, "FAIL", {"sweep.error": f"{type(exc).__name__}: {exc}"[:5000]})
        raise
    payload = checkpoint_payload(data, cfg.study, train_cfg, best, source.number, run_id)
    log_best(tracker, run_id, best, with_tail_weights(payload, best["state_dict"], blocks))
    number = _add_trial(study, source, best["metrics"], run_id, blocks)
    tracker.end_trial(run_id, "COMPLETE", {"optuna.trial_number": number})


def with_tail_weights(payload: dict, tail_state: dict, blocks: int) -> dict:
    """A head checkpoint turned into a stage-2 one: `tail_state` (of `model.tail()`) split into the
    head's weights and those of the trunk's trained blocks, which export loads into features[cut:]."""

    def part(prefix: str) -> dict:
        return {k.removeprefix(prefix): v for k, v in tail_state.items() if k.startswith(prefix)}

    return {
        **payload,
        "state_dict": part(HEAD_PREFIX),
        "trunk_state_dict": part(TRUNK_PREFIX),
        "finetune_blocks": blocks,
        "stage": FINETUNE_STAGE,
    }


def _train(
    cfg: SweepConfig,
    data: SweepData,
    head: dict,
    train_cfg: TrainConfig,
    tracker: Tracker,
    run_id: str,
    best: dict,
    device: torch.device,
    report: Callable[[str], None],
) -> None:
    """Train the blocks after the cut and the head on the cached activations; `best` gets the
    history and the best validation epoch's weights of the tail."""
    set_seed(train_cfg.seed)
    model = ClothingClassifierMobileNet(
        head["num_classes"],
        head["size_inner"],
        head.get("dropout", 0.0),
        load_backbone(cfg.backbone_weights),
        finetune_blocks=cfg.finetune_blocks,
    )
    model.head.load_state_dict(head["state_dict"])
    tail = model.tail()
    optimizer = torch.optim.AdamW(
        trainable_parameters(tail), lr=train_cfg.lr, weight_decay=train_cfg.weight_decay, fused=True
    )
    generator = torch.Generator().manual_seed(train_cfg.seed)
    train_batches = FeatureBatches(
        data.train.activations().to(device),
        data.train.labels.to(device),
        train_cfg.batch_size,
        shuffle=True,
        generator=generator,
        views=True,
    )
    val_batches = FeatureBatches(data.val.activations()[:, 0].to(device), data.val.labels.to(device), 128)
    started = time.perf_counter()

    def on_epoch(epoch: int, metrics: dict, module: nn.Module) -> None:
        track_epoch(tracker, run_id, best, metrics, module)
        report(
            f"  finetune epoch {epoch:2d}  val_acc {metrics['val_acc']:.3f}  "
            f"gap {metrics['train_acc'] - metrics['val_acc']:+.3f}  {time.perf_counter() - started:5.1f}s"
        )

    criterion = nn.CrossEntropyLoss(label_smoothing=train_cfg.label_smoothing)
    train_and_evaluate(tail, optimizer, train_batches, val_batches, criterion, train_cfg.epochs, device, on_epoch)


def _add_trial(study: optuna.Study, source: TrialRecord, metrics: dict, run_id: str, blocks: int) -> int:
    """Record the finished stage 2 as a COMPLETE Optuna trial with the winner's parameters."""
    distributions = study.trials[source.number].distributions
    study.add_trial(
        optuna.trial.create_trial(
            params=dict(source.params),
            distributions=distributions,
            value=metrics["val_acc"],
            user_attrs={
                **best_attrs(metrics),
                "mlflow_run_id": run_id,
                "stage": FINETUNE_STAGE,
                "source_trial": source.number,
                "finetune_blocks": blocks,
            },
        )
    )
    return next(t.number for t in study.get_trials(deepcopy=False) if t.user_attrs.get("mlflow_run_id") == run_id)
