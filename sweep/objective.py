"""One trial of either stage, as optuna-examples writes an objective: suggest -> train -> report each
epoch -> return the best val_acc, tracked as one nested MLflow run (`Tracker.trial_run`).

Stage 1 (`HeadTrial`) trains a head on the frozen backbone's cached features. Stage 2
(`FinetuneTrial`) goes on from a stage-1 trial's head, the course's recipe: unfreeze the trunk's last
blocks and train them with a small learning rate, on the activations cached at the cut, so the frozen
part of the trunk never runs again. Its recipe is one frozen dataclass, `Stage2Recipe`, pinned on
the stage-2 study so that the trial's params are exactly what it trained with.

`TrackedObjective` does the rest the same way for both: it opens the run named after the trial, logs
each epoch, reports to Optuna and prunes, keeps the best validation epoch's weights, and however the
trial ends (complete, pruned, diverged, failed, interrupted, or failed by another worker) records the
outcome in both stores.
"""

from __future__ import annotations

import copy
import functools
import tempfile
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, ClassVar, Protocol

import optuna
import torch
from optuna.exceptions import UpdateFinishedTrialError
from torch import nn

from clothing.checkpoint import HEAD, checkpoint, save_checkpoint, spec_of
from clothing.model import (
    MAX_FINETUNE_BLOCKS,
    ModelSpec,
    build_head,
    build_model,
    count_parameters,
    head_only,
    load_backbone,
    trainable_parameters,
)
from clothing.train import EarlyStopping, EpochCallback, FeatureBatches, TrainingDiverged, set_seed, train_and_evaluate
from sweep.config import MAX_EPOCHS, Stage1Settings
from sweep.data import SweepData, fold_rows
from sweep.plots import learning_curves
from sweep.ranking import FINETUNE_STAGE, HEAD_STAGE, TrialRecord, format_number, trial_name
from sweep.space import Dimension, suggest_head
from sweep.storage import TAKEN_OVER_REASON
from sweep.tracking import CHECKPOINT_FILE, ParentRun, Tracker, log_lineage, now_ms

EVAL_BATCH = 1024  # evaluation has no gradients: large batches only save Python overhead
# Stage 2's honest train_acc reads a quarter of the training images: each epoch's pass over all of them
# cost 16-18 s against 36-45 s of training steps (7 blocks, fp32, 2-core AVX-512), and the quarter's
# accuracy stays within its standard error of the whole (0.003 at 0.99; measured -0.003 to 0.000 over
# three epochs: docs/benchmarks.md). Stage 1's pass, on pooled features, is cheap and reads them all.
HONEST_FOLDS = 4
AUTOCAST = {"fp32": None, "bf16": torch.bfloat16}  # a stage-2 trial's `train_precision` -> the loop's autocast


class TrialTakenOver(RuntimeError):
    """This process's trial was failed as stale by another worker; it was stopped and its run closed."""


@dataclass(frozen=True)
class TrainConfig:
    """What one trial trains with: the sampled hyperparameters plus the fixed settings."""

    lr: float
    size_inner: int
    dropout: float = 0.0
    weight_decay: float = 0.0
    label_smoothing: float = 0.0
    epochs: int = 10
    batch_size: int = 32
    seed: int = 42


def _pinned(dimension: Dimension, older: Any = MISSING) -> Any:
    """A Stage2Recipe field: the distribution Optuna records its pinned value under, and the value a
    trial from before the field existed trained with (MISSING: every recorded trial has it)."""
    return field(metadata={"dimension": dimension, "older": older})


@dataclass(frozen=True)
class Stage2Recipe:
    """What a stage-2 trial trains with: its source trial and that trial's head configuration (`head`:
    its params but the lr and label smoothing), the blocks it unfreezes and how it trains them. Every
    field below is a param of the trial, pinned on the stage-2 study (PartialFixedSampler); from these
    fields come the pinned params, the trial's description, the checkpoint's provenance and how an
    older trial's params are read, so adding a field is one edit."""

    source_trial: int = _pinned(Dimension("source_trial", "int", 0, 2**31 - 1))
    finetune_blocks: int = _pinned(Dimension("finetune_blocks", "int", 1, MAX_FINETUNE_BLOCKS))
    lr: float = _pinned(Dimension("lr", "log-float", 1e-7, 1e-2))
    epochs: int = _pinned(Dimension("epochs", "int", 1, MAX_EPOCHS))
    train_precision: str = _pinned(Dimension("train_precision", "categorical", choices=("fp32", "bf16")), "fp32")
    patience: int = _pinned(Dimension("patience", "int", 0, MAX_EPOCHS), 0)
    head: dict = field(default_factory=dict)
    # Levers measured and removed (docs/benchmarks.md, "Tried and removed"): an older trial that ran one
    # of them at another value than this is another recipe.
    RETIRED: ClassVar[dict] = {"average": "none", "schedule": "constant", "lr_decay": 1.0, "label_smoothing": 0.0}

    @classmethod
    def _pinned_fields(cls) -> list:
        return [f for f in fields(cls) if "dimension" in f.metadata]

    def pinned(self) -> dict:
        """The values the stage-2 study pins: the trial's params."""
        return {**self.head, **self.provenance()}

    def provenance(self) -> dict:
        """The recipe's own values (the head is the checkpoint's spec): what its checkpoint says of it."""
        return {f.name: getattr(self, f.name) for f in self._pinned_fields()}

    def suggest(self, trial: optuna.Trial, head_space: tuple[Dimension, ...]) -> Stage2Recipe:
        """The recipe as the trial records it: each value through its distribution (the head's through
        stage 1's, as the source sampled them), which the pinning sampler answers with the value."""
        values = {f.name: f.metadata["dimension"].suggest(trial) for f in self._pinned_fields()}
        head = {d.name: d.suggest(trial) for d in head_space if d.name in self.head}
        return Stage2Recipe(**values, head=head)

    def describe(self, source: str) -> str:
        return (
            f"stage 2: fine-tuning {source}'s last {self.finetune_blocks} block(s), lr {format_number(self.lr)}, "
            f"{self.train_precision}"
        )

    @classmethod
    def read(cls, params: dict) -> Stage2Recipe | None:
        """The recipe a recorded stage-2 trial ran: a param newer than the trial takes the value it
        trained with; None when it ran a retired lever."""
        if any(params.get(name, neutral) != neutral for name, neutral in cls.RETIRED.items()):
            return None
        values = {}
        for f in cls._pinned_fields():
            if f.name in params:
                values[f.name] = params[f.name]
            elif f.metadata["older"] is not MISSING:
                values[f.name] = f.metadata["older"]
            else:
                return None
        head = {k: v for k, v in params.items() if k not in values and k not in cls.RETIRED}
        return cls(**values, head=head)

    def train_config(self, stage1: Stage1Settings) -> TrainConfig:
        return TrainConfig(lr=self.lr, **self.head, epochs=self.epochs, batch_size=stage1.batch_size, seed=stage1.seed)


def stage2_recipe(source: TrialRecord, blocks: int, lr: float, epochs: int, precision: str, patience: int):
    """The recipe that fine-tunes `source`: its head configuration, the sweep's stage-2 settings."""
    head = {k: v for k, v in source.params.items() if k not in ("lr", "label_smoothing")}
    return Stage2Recipe(source.number, blocks, lr, epochs, precision, patience, head)


def weights_copy(model: nn.Module) -> dict:
    """The model's weights as they are now, on the CPU, untouched by further training."""
    return copy.deepcopy({k: v.cpu() for k, v in model.state_dict().items()})


@dataclass
class BestEpoch:
    """The history so far, and the metrics, weights and logging time (ms) of the best validation epoch."""

    history: list[dict] = field(default_factory=list)
    metrics: dict | None = None
    state_dict: dict | None = None
    timestamp: int = 0

    def update(self, metrics: dict, model: nn.Module, timestamp: int) -> None:
        self.history.append(dict(metrics))
        if self.metrics is None or metrics["val_acc"] > self.metrics["val_acc"]:
            self.metrics, self.timestamp = dict(metrics), timestamp
            self.state_dict = weights_copy(model)


class TrialTask(Protocol):
    """One stage's kind of trial."""

    stage: str

    def suggest(self, trial: optuna.Trial) -> Any:
        """The trial's configuration, through the search space."""

    def spec(self, config: Any) -> ModelSpec:
        """The model a trial of this configuration trains (part of)."""

    def params(self, config: Any) -> dict:
        """What the MLflow run logs as params."""

    def train(self, config: Any, on_epoch: EpochCallback) -> None:
        """Run `train_and_evaluate` with `on_epoch`."""

    def checkpoint(self, config: Any, best: BestEpoch, provenance: dict) -> dict:
        """The best epoch's checkpoint (trial_checkpoint(), with `provenance`)."""


def trial_checkpoint(data: SweepData, spec: ModelSpec, train: TrainConfig, best: BestEpoch, provenance: dict) -> dict:
    """A trial's checkpoint: the best epoch's weights of what it trained (keyed as in the model's
    tail), the spec to rebuild the model around them, and where they came from."""
    provenance = {
        "backbone_fingerprint": data.backbone_id,
        "feature_precision": data.train.precision,  # `best` scores with the features the trial saw
        "feature_engine": data.train.engine,
        **provenance,
    }
    return checkpoint(
        HEAD, spec, best.state_dict, train_config=asdict(train), metrics=best.metrics, provenance=provenance
    )


class HeadTrial:
    """Stage 1: a head on the frozen backbone's cached features."""

    stage = HEAD_STAGE

    def __init__(self, data: SweepData, device: torch.device, settings: Stage1Settings, precision: str) -> None:
        self.data, self.device, self.settings, self.precision = data, device, settings, precision
        # Features move to the device once; every trial and epoch reuses them. Training draws one of
        # the cached views of each image per epoch; validation, and the honest train_acc, see the
        # plain images.
        self.train_xy = (data.train.features.to(device), data.train.labels.to(device))
        self.train_plain = data.train.plain.to(device)
        self.val_xy = (data.val.plain.to(device), data.val.labels.to(device))

    def suggest(self, trial: optuna.Trial) -> TrainConfig:
        s = self.settings
        return TrainConfig(**suggest_head(trial, s.space), epochs=s.epochs, batch_size=s.batch_size, seed=s.seed)

    def spec(self, config: TrainConfig) -> ModelSpec:
        return ModelSpec(tuple(self.data.classes), config.size_inner, config.dropout, image_size=self.data.image_size)

    def params(self, config: TrainConfig) -> dict:
        return {
            **asdict(config),
            "image_size": self.data.image_size,
            "backbone": self.data.backbone_id,
            "precision": self.precision,
            "engine": self.data.train.engine,
            "num_train": len(self.train_xy[1]),
            "views": self.data.train.views,
        }

    def train(self, config: TrainConfig, on_epoch: EpochCallback) -> None:
        classes = len(self.data.classes)
        train_head(config, classes, self.train_xy, self.train_plain, self.val_xy, self.device, on_epoch)

    def checkpoint(self, config: TrainConfig, best: BestEpoch, provenance: dict) -> dict:
        return trial_checkpoint(self.data, self.spec(config), config, best, provenance)


def train_head(  # noqa: PLR0913 - the trial's data, device and callback
    config: TrainConfig,
    num_classes: int,
    train_xy: tuple[torch.Tensor, torch.Tensor],
    train_plain: torch.Tensor,
    val_xy: tuple[torch.Tensor, torch.Tensor],
    device: torch.device,
    on_epoch: EpochCallback | None = None,
) -> list[dict]:
    """One stage-1 trial's training: a head on cached features (`train_xy` with every view, the plain
    training rows for the honest train_acc, the validation rows), as `bench` times it too."""
    set_seed(config.seed)
    # Named as in the full model's tail, so the checkpoint's keys are the same for both stages.
    head = head_only(build_head(num_classes, config.size_inner, config.dropout)).to(device)
    # AdamW with weight_decay=0 is exactly Adam; with decay it is the decoupled form that works.
    # fused=True: one kernel per step instead of several passes over the weights, which halves a
    # size_inner=1000 epoch on a small CPU (bench/ measured 0.67 s against 1.30 s).
    optimizer = torch.optim.AdamW(
        trainable_parameters(head), lr=config.lr, weight_decay=config.weight_decay, fused=True
    )
    generator = torch.Generator().manual_seed(config.seed)
    train_batches = FeatureBatches(*train_xy, config.batch_size, shuffle=True, generator=generator, views=True)
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    return train_and_evaluate(
        head,
        optimizer,
        train_batches,
        FeatureBatches(*val_xy, EVAL_BATCH),
        criterion,
        config.epochs,
        device,
        on_epoch,
        train_eval_loader=FeatureBatches(train_plain, train_xy[1], EVAL_BATCH),
    )


class FinetuneTrial:
    """Stage 2: the source trial's head plus the trunk's last blocks, trained on the activations at the cut."""

    stage = FINETUNE_STAGE

    def __init__(  # noqa: PLR0913 - the recipe, its source's head, and where it trains
        self,
        recipe: Stage2Recipe,
        source_head: dict,
        data: SweepData,
        device: torch.device,
        settings: Stage1Settings,
        backbone_weights: str,
    ) -> None:
        self.recipe, self.source_head, self.data, self.device = recipe, source_head, data, device
        self.settings, self.backbone_weights = settings, backbone_weights

    def suggest(self, trial: optuna.Trial) -> Stage2Recipe:
        drawn = self.recipe.suggest(trial, self.settings.space)
        if drawn != self.recipe:  # the head and the activations were prepared for this recipe alone
            raise RuntimeError(f"stage 2 drew {drawn.pinned()}, but the run prepared {self.recipe.pinned()}")
        return drawn

    def spec(self, recipe: Stage2Recipe) -> ModelSpec:
        return replace(spec_of(self.source_head), finetune_blocks=recipe.finetune_blocks)

    def params(self, recipe: Stage2Recipe) -> dict:
        return {
            **asdict(recipe.train_config(self.settings)),
            **recipe.provenance(),
            "views": self.data.train.views,
            "image_size": self.data.image_size,
            "backbone": self.data.backbone_id,
        }

    def train(self, recipe: Stage2Recipe, on_epoch: EpochCallback) -> None:
        device, data, cfg = self.device, self.data, recipe.train_config(self.settings)
        set_seed(cfg.seed)
        model = build_model(self.spec(recipe), load_backbone(self.backbone_weights))
        head_only(model.head).load_state_dict(self.source_head["state_dict"])  # the source trial's trained head
        # Channels-last weights and batches: bench/ measured a 3-block training step 1.25x and an
        # evaluation batch 1.7x faster on a 2-core CPU than in the default layout.
        tail = model.tail().to(memory_format=torch.channels_last)
        optimizer = torch.optim.AdamW(trainable_parameters(tail), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
        generator = torch.Generator().manual_seed(cfg.seed)
        activations = data.train.activations()
        labels = data.train.labels.to(device)
        batches = functools.partial(FeatureBatches, channels_last=True)
        train_batches = batches(activations.to(device), labels, cfg.batch_size, True, generator, views=True)
        # The honest train_acc: the plain view, in eval mode, of a fixed stratified share of the
        # training images (fold 1 of HONEST_FOLDS); see HONEST_FOLDS.
        honest = torch.from_numpy(fold_rows(data.train.labels, 1, HONEST_FOLDS)[1])
        train_eval = batches(activations[honest, 0].to(device), data.train.labels[honest].to(device), EVAL_BATCH // 4)
        val_batches = batches(data.val.activations()[:, 0].to(device), data.val.labels.to(device), EVAL_BATCH // 4)
        train_and_evaluate(
            tail,
            optimizer,
            train_batches,
            val_batches,
            nn.CrossEntropyLoss(),
            cfg.epochs,
            device,
            on_epoch,
            train_eval_loader=train_eval,
            autocast=AUTOCAST[recipe.train_precision],
            early_stop=EarlyStopping(recipe.patience),
        )

    def checkpoint(self, recipe: Stage2Recipe, best: BestEpoch, provenance: dict) -> dict:
        train = recipe.train_config(self.settings)
        return trial_checkpoint(self.data, self.spec(recipe), train, best, {**recipe.provenance(), **provenance})


@functools.cache
def parameter_counts(spec: ModelSpec) -> tuple[int, int]:
    """(trainable, total) parameters of the model `spec` describes; cached, as most trials share a spec."""
    return count_parameters(build_model(spec))


class TrackedObjective:
    """An Optuna objective that runs `task`'s trials, each tracked as one run nested under `parent`."""

    def __init__(self, task: TrialTask, tracker: Tracker, parent: ParentRun, data: SweepData) -> None:
        self.task, self.tracker, self.parent, self.lineage = task, tracker, parent, data.lineage
        self.taken_over: list[int] = []  # numbers of this process's trials that another worker failed

    @property
    def stage(self) -> str:
        return self.task.stage

    def __call__(self, trial: optuna.Trial) -> float:
        try:  # from the first write on: whatever fails, the trial says why, and so does its run if it has one
            trial.set_user_attr("stage", self.stage)
            config = self.task.suggest(trial)
            return self._run(trial, config)
        except optuna.TrialPruned:
            raise
        except UpdateFinishedTrialError as exc:
            # Another worker failed this trial as stale while it still ran: its heartbeat did not reach
            # the database in time (an outage longer than the grace period, an overloaded machine).
            # Optuna keeps that FAIL; the run, if it has one, said so as it closed.
            self.taken_over.append(trial.number)
            raise TrialTakenOver(TAKEN_OVER_REASON) from exc
        except KeyboardInterrupt:
            trial.set_user_attr("error", "interrupted")
            raise
        except Exception as exc:
            trial.set_user_attr("error", f"{type(exc).__name__}: {exc}")
            raise

    def _run(self, trial: optuna.Trial, config: Any) -> float:
        """Train in the trial's run; the run closes with the trial's outcome (Tracker.trial_run)."""
        tracker, best, name = self.tracker, BestEpoch(), trial_name(self.stage, trial.number)

        def on_epoch(epoch: int, metrics: dict, model: nn.Module) -> None:
            stamp = now_ms()
            tracker.log_epoch(run_id, {k: v for k, v in metrics.items() if k != "epoch"}, step=epoch, timestamp=stamp)
            best.update(metrics, model, stamp)
            trial.report(metrics["val_acc"], epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at epoch {epoch} (val_acc {metrics['val_acc']:.3f})")

        with tracker.trial_run(self.parent, name, trial.number, self.stage, self.task.params(config)) as run_id:
            trial.set_user_attr("mlflow_run_id", run_id)
            log_lineage(tracker, run_id, self.lineage.splits, self.lineage.tags)
            # "N trainable of M parameters", as Lightning's fine-tuning example reports it.
            trainable, total = parameter_counts(self.task.spec(config))
            tracker.log(run_id, params={"trainable_parameters": trainable, "total_parameters": total})
            stopped = None
            try:
                self.task.train(config, on_epoch)
            except optuna.TrialPruned as exc:
                stopped = exc
            except TrainingDiverged as exc:
                stopped = optuna.TrialPruned(f"diverged: {exc}")
            if best.metrics is not None:
                provenance = {"study": self.parent.study, "trial": name, "stage": self.stage, "mlflow_run_id": run_id}
                self._record_best(trial, run_id, best, self.task.checkpoint(config, best, provenance))
            if stopped is not None:
                raise stopped
        return best.metrics["val_acc"]

    def _record_best(self, trial: optuna.Trial, run_id: str, best: BestEpoch, payload: dict) -> None:
        """The best epoch's scores on the Optuna trial (what the winner rule reads) and on the run (the
        summary metrics, apart from the curves by their `best/` prefix), its curves, and its checkpoint
        as the run's logged model, with the best epoch's metrics linked to it (its id on the trial)."""
        m = best.metrics
        for key, value in {"best_epoch": m["epoch"], "train_acc": m["train_acc"], "val_acc": m["val_acc"]}.items():
            trial.set_user_attr(key, value)
        summary = {"epoch": m["epoch"], "train_acc": m["train_acc"], "val_acc": m["val_acc"]}
        summary["gap"] = m["train_acc"] - m["val_acc"]
        self.tracker.log(run_id, metrics={f"best/{k}": v for k, v in summary.items()})
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "checkpoint"
            folder.mkdir()
            save_checkpoint(payload, folder / CHECKPOINT_FILE)
            model_id = self.tracker.log_checkpoint(run_id, folder)
            trial.set_user_attr("mlflow_model_id", model_id)
            linked = {k: m[k] for k in ("val_acc", "train_acc", "val_loss", "train_loss")} | {"gap": summary["gap"]}
            self.tracker.link_metrics(run_id, model_id, linked, m["epoch"], best.timestamp)
            curves = learning_curves(best.history, m["epoch"], Path(tmp) / "curves.png")
            self.tracker.log_file(run_id, curves, "plots")
