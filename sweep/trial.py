"""The trial machinery both stages share: one Optuna trial = one nested MLflow run.

A stage says what its trials are (a `TrialTask`: suggest -> train -> checkpoint); `TrackedObjective`
does the rest the same way for every stage: it opens the run named after the trial, logs each epoch,
reports to Optuna and prunes, keeps the best validation epoch, and whatever way the trial ends
(complete, pruned, diverged, failed, interrupted, or failed by another worker) closes the run with the
matching state and says why in both stores.
"""

from __future__ import annotations

import copy
import functools
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from torch import nn

from clothing.checkpoint import HEAD, checkpoint, save_checkpoint
from clothing.model import ModelSpec, build_model, count_parameters
from clothing.train import TrainingDiverged
from sweep.config import TrainConfig
from sweep.data import SweepData
from sweep.outages import TAKEN_OVER_REASON, TrialTakenOver
from sweep.plots import learning_curves
from sweep.select import trial_name
from sweep.session import Session
from sweep.tracking import CHECKPOINT_ARTIFACT, Tracker

EpochCallback = Callable[[int, dict, nn.Module], None]


def weights_copy(model: nn.Module) -> dict:
    """The model's weights as they are now, on the CPU, untouched by further training."""
    return copy.deepcopy({k: v.cpu() for k, v in model.state_dict().items()})


@dataclass
class BestEpoch:
    """The history so far, and the metrics and weights of the best validation epoch."""

    history: list[dict] = field(default_factory=list)
    metrics: dict | None = None
    state_dict: dict | None = None

    def update(self, metrics: dict, model: nn.Module) -> None:
        self.history.append(dict(metrics))
        if self.metrics is None or metrics["val_acc"] > self.metrics["val_acc"]:
            self.metrics = dict(metrics)
            self.state_dict = weights_copy(model)


class TrialTask(Protocol):
    """One stage's kind of trial."""

    stage: str

    def suggest(self, trial: optuna.Trial) -> Any:
        """The trial's configuration, through the stage's search space."""

    def spec(self, config: Any) -> ModelSpec:
        """The model a trial of this configuration trains part of."""

    def params(self, config: Any) -> dict:
        """What the MLflow run logs as params."""

    def train(self, config: Any, on_epoch: EpochCallback) -> None:
        """Run `train_and_evaluate` with `on_epoch`."""

    def checkpoint(self, config: Any, best: BestEpoch, **provenance: Any) -> dict:
        """The best epoch's checkpoint (trial_checkpoint(), with `provenance` added)."""


def trial_checkpoint(
    data: SweepData, cfg: TrainConfig, best: BestEpoch, finetune_blocks: int = 0, **provenance: Any
) -> dict:
    """A trial's checkpoint: the best epoch's weights of what it trained (keyed as in the model's
    tail), the spec to rebuild the model around them, and where they came from."""
    spec = ModelSpec(
        classes=tuple(data.classes),
        size_inner=cfg.size_inner,
        dropout=cfg.dropout,
        finetune_blocks=finetune_blocks,
        image_size=data.image_size,
    )
    provenance = {
        "backbone_fingerprint": data.backbone_id,
        "feature_precision": data.train.precision,  # `best` scores with the features the trial saw
        "feature_engine": data.train.engine,
        **provenance,
    }
    return checkpoint(
        HEAD, spec, best.state_dict, train_config=asdict(cfg), metrics=best.metrics, provenance=provenance
    )


@functools.cache
def parameter_counts(spec: ModelSpec) -> tuple[int, int]:
    """(trainable, total) parameters of the model `spec` describes; cached, as most trials share a spec."""
    return count_parameters(build_model(spec))


def best_attrs(metrics: dict) -> dict:
    """What the Optuna trial keeps for the winner rule: the scores at the checkpointed epoch."""
    return {"best_epoch": metrics["epoch"], "train_acc": metrics["train_acc"], "val_acc": metrics["val_acc"]}


class TrackedObjective:
    """An Optuna objective that runs `task`'s trials, each tracked as one nested MLflow run."""

    def __init__(self, session: Session, task: TrialTask) -> None:
        self.session, self.task = session, task
        self.taken_over: list[int] = []  # numbers of this process's trials that another worker failed
        self._run_id: str | None = None  # the running trial's run, once created

    @property
    def stage(self) -> str:
        return self.task.stage

    def __call__(self, trial: optuna.Trial) -> float:
        self._run_id = None
        try:
            return self._run(trial)
        except UpdateFinishedTrialError as exc:
            # Another worker failed this trial as stale while it still ran: its heartbeat did not reach
            # the database in time (an outage longer than the grace period, an overloaded machine).
            # Optuna keeps that FAIL; the run, which that worker may not have known of, says so too.
            self.taken_over.append(trial.number)
            if self._run_id is not None:
                self.session.tracker.end_trial(self._run_id, "FAIL", TAKEN_OVER_REASON)
            raise TrialTakenOver(TAKEN_OVER_REASON) from exc

    def _run(self, trial: optuna.Trial) -> float:
        session, best, config = self.session, BestEpoch(), None

        def on_epoch(epoch: int, metrics: dict, model: nn.Module) -> None:
            session.tracker.log_epoch(self._run_id, {k: v for k, v in metrics.items() if k != "epoch"}, step=epoch)
            best.update(metrics, model)
            trial.report(metrics["val_acc"], epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at epoch {epoch} (val_acc {metrics['val_acc']:.3f})")

        try:  # from the first write on: whatever fails, the trial says why, and so does its run if it has one
            trial.set_user_attr("stage", self.stage)
            config = self.task.suggest(trial)
            self._start_run(trial, config)
            # "N trainable of M parameters", as Lightning's fine-tuning example reports it.
            trainable, total = parameter_counts(self.task.spec(config))
            session.tracker.log_params(self._run_id, {"trainable_parameters": trainable, "total_parameters": total})
            self.task.train(config, on_epoch)
        except optuna.TrialPruned as exc:
            self._close(trial, config, best, "PRUNED", str(exc) or "pruned")
            raise
        except TrainingDiverged as exc:
            reason = f"diverged: {exc}"
            self._close(trial, config, best, "PRUNED", reason)
            raise optuna.TrialPruned(reason) from exc
        except UpdateFinishedTrialError:
            raise  # the trial is no longer this process's to record: see __call__
        except KeyboardInterrupt:
            self._fail(trial, "interrupted", "interrupted (Ctrl-C)")
            raise
        except Exception as exc:
            message = f"{type(exc).__name__}: {exc}"
            self._fail(trial, message, message)
            raise
        self._close(trial, config, best, "COMPLETE")
        return best.metrics["val_acc"]

    def _start_run(self, trial: optuna.Trial, config: Any) -> None:
        """The trial's run, named as the trial is everywhere else, with its params and the data's lineage."""
        session, name = self.session, trial_name(self.stage, trial.number)
        params = self.task.params(config)
        self._run_id = session.tracker.start_trial(session.parent, name, trial.number, params, self.stage)
        trial.set_user_attr("mlflow_run_id", self._run_id)
        session.tracker.log_lineage(self._run_id, session.data.lineage.splits, session.data.lineage.tags)

    def _fail(self, trial: optuna.Trial, error: str, reason: str) -> None:
        """A failed trial says why in Optuna; its run, if it got one, is closed FAILED with the reason."""
        trial.set_user_attr("error", error)
        if self._run_id is not None:
            self.session.tracker.end_trial(self._run_id, "FAIL", reason)

    def _close(self, trial: optuna.Trial, config: Any, best: BestEpoch, state: str, reason: str = "") -> None:
        """The one way a trial's run ends: with at least one epoch, its scores at the best epoch go to
        the Optuna trial (what the winner rule reads) and the run gets the summary, the checkpoint and
        the curves; then the run is closed with the status that matches `state`, and why."""
        tracker, run_id = self.session.tracker, self._run_id
        if best.metrics is not None:
            for key, value in best_attrs(best.metrics).items():
                trial.set_user_attr(key, value)
            provenance = {
                "study": self.session.cfg.study,
                "trial": trial_name(self.stage, trial.number),
                "stage": self.stage,
                "mlflow_run_id": run_id,
            }
            _log_best(tracker, run_id, best, self.task.checkpoint(config, best, **provenance))
        tracker.end_trial(run_id, state, reason)


def summary_metrics(metrics: dict) -> dict[str, float]:
    """The run's single values at its checkpointed epoch. The `best/` prefix keeps them apart from the
    per-epoch curves (logged at step = epoch), in MLflow's charts and in its column list."""
    return {
        "best/epoch": metrics["epoch"],
        "best/train_acc": metrics["train_acc"],
        "best/val_acc": metrics["val_acc"],
        "best/gap": metrics["train_acc"] - metrics["val_acc"],
    }


def log_checkpoint(tracker: Tracker, run_id: str, payload: dict) -> None:
    """The checkpoint as the run's artifact, where `Tracker.run_checkpoint` reads it."""
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint_file = save_checkpoint(payload, Path(tmp) / Path(CHECKPOINT_ARTIFACT).name)
        tracker.log_file(run_id, checkpoint_file, str(Path(CHECKPOINT_ARTIFACT).parent))


def _log_best(tracker: Tracker, run_id: str, best: BestEpoch, payload: dict) -> None:
    """Summary metrics at the checkpointed epoch, the checkpoint and the learning curves."""
    m = best.metrics
    tracker.log_metrics(run_id, summary_metrics(m))
    log_checkpoint(tracker, run_id, payload)
    with tempfile.TemporaryDirectory() as tmp:
        curves = learning_curves(best.history, m["epoch"], Path(tmp) / "curves.png")
        tracker.log_file(run_id, curves, "plots")
