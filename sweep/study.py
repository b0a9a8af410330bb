"""The Optuna side of a sweep: storage, sampler, pruner, the objective, and the trial loop.

The objective is suggest -> train the head on cached features -> return the best val accuracy.
Tracking, checkpointing and pruning happen in the training loop's on_epoch callback.
"""

from __future__ import annotations

import copy
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import optuna
import torch
from optuna.trial import TrialState
from torch import nn

from clothing.checkpoint import FORMAT_VERSION, HEAD, save_checkpoint
from clothing.data import IMAGE_SIZE, IMAGENET_MEAN, IMAGENET_STD, ClothingDataset, build_transforms
from clothing.features import FeatureBatches, FeatureSet, cached_features
from clothing.model import build_head, load_backbone, trainable_parameters, weights_fingerprint
from clothing.train import TrainingDiverged, set_seed, train_and_evaluate
from sweep.config import SweepConfig, TrainConfig
from sweep.select import TrialRecord
from sweep.space import suggest
from sweep.tracking import Tracker, rows_to_csv

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
# A trial whose process died stops sending heartbeats; after the grace period the next worker to
# start a trial marks it FAIL (and our callback closes its MLflow run). Short enough that a resume
# right after a crash finds it, long enough that a busy worker never looks dead.
HEARTBEAT_SECONDS = int(os.environ.get("SWEEP_HEARTBEAT_SECONDS", "5"))
GRACE_SECONDS = 4 * HEARTBEAT_SECONDS

Report = Callable[[str], None]


class SweepError(RuntimeError):
    """The sweep cannot go on; the message says why."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SweepError("--device cuda was asked for but no CUDA GPU is available; use --device cpu or auto")
    return torch.device(name)


def _mark_stale_run_failed(tracker_uri: str) -> Callable[[optuna.Study, optuna.trial.FrozenTrial], None]:
    """Heartbeat callback: a trial whose worker died gets its MLflow run closed as FAILED."""

    def callback(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        run_id = trial.user_attrs.get("mlflow_run_id")
        if run_id:
            Tracker(tracker_uri).end_trial(run_id, "FAIL", {"sweep.error": "worker stopped (no heartbeat)"})

    return callback


def make_storage(url: str, tracking_uri: str | None = None) -> optuna.storages.BaseStorage:
    """An Optuna storage with heartbeats, so that a crashed trial does not stay RUNNING forever."""
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    if url.startswith(("sqlite", "postgresql", "mysql")):
        engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
        return optuna.storages.RDBStorage(
            url,
            engine_kwargs=engine_kwargs,
            heartbeat_interval=HEARTBEAT_SECONDS,
            grace_period=GRACE_SECONDS,
            heartbeat_stale_trial_callback=_mark_stale_run_failed(tracking_uri) if tracking_uri else None,
        )
    return optuna.storages.get_storage(url)


def open_study(cfg: SweepConfig, create: bool = True) -> optuna.Study:
    storage = make_storage(cfg.storage, cfg.tracking_uri)
    if not create:
        try:
            return optuna.load_study(study_name=cfg.study, storage=storage)
        except KeyError as exc:
            raise SweepError(
                f"no study named {cfg.study!r} in {cfg.storage}; run `python -m sweep run --study {cfg.study}` first"
            ) from exc
    pruner = (
        optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=2)
        if cfg.pruner == "median"
        else optuna.pruners.NopPruner()
    )
    return optuna.create_study(
        study_name=cfg.study,
        storage=storage,
        direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=cfg.seed),
        pruner=pruner,
        load_if_exists=True,
    )


def trial_records(study: optuna.Study) -> list[TrialRecord]:
    """The study's trials as the winner rule sees them (metrics at each trial's checkpointed epoch)."""
    return [
        TrialRecord(
            number=t.number,
            state=t.state.name,
            params=dict(t.params),
            best_epoch=t.user_attrs.get("best_epoch"),
            train_acc=t.user_attrs.get("train_acc"),
            val_acc=t.user_attrs.get("val_acc"),
            run_id=t.user_attrs.get("mlflow_run_id"),
        )
        for t in study.get_trials(deepcopy=False)
    ]


def record_rows(records: list[TrialRecord]) -> list[dict]:
    """Flat rows for tables and CSV files."""
    return [
        {
            "number": r.number,
            "state": r.state,
            "lr": r.params.get("lr"),
            "size_inner": r.params.get("size_inner"),
            "best_epoch": r.best_epoch,
            "train_acc": r.train_acc,
            "val_acc": r.val_acc,
            "gap": r.gap,
            "mlflow_run_id": r.run_id,
        }
        for r in records
    ]


@dataclass
class SweepData:
    classes: list[str]
    train: FeatureSet
    val: FeatureSet
    backbone_id: str


def load_splits(data_dir: Path) -> tuple[ClothingDataset, ClothingDataset]:
    transform = build_transforms(IMAGE_SIZE)
    train = ClothingDataset(data_dir / "train", transform)
    val = ClothingDataset(data_dir / "validation", transform, class_to_idx=train.class_to_idx)
    return train, val


def prepare_data(
    cfg: SweepConfig,
    device: torch.device,
    splits: tuple[ClothingDataset, ClothingDataset] | None = None,
) -> SweepData:
    """Cached features of the train and validation splits (one backbone pass on a cold cache)."""
    train_set, val_set = splits or load_splits(cfg.data_dir)
    backbone = load_backbone(cfg.backbone_weights)
    options = dict(device=device, precision=cfg.precision, skip_bad_images=cfg.skip_bad_images, progress=cfg.progress)
    train = cached_features(train_set, backbone, cfg.cache_dir, **options)
    val = cached_features(val_set, backbone, cfg.cache_dir, **options)
    return SweepData(train_set.classes, train, val, weights_fingerprint(backbone))


class Objective:
    """suggest -> train the head on cached features -> best validation accuracy."""

    def __init__(
        self,
        cfg: SweepConfig,
        data: SweepData,
        tracker: Tracker,
        experiment_id: str,
        parent_id: str,
        device: torch.device,
    ) -> None:
        self.cfg, self.data, self.tracker = cfg, data, tracker
        self.experiment_id, self.parent_id, self.device = experiment_id, parent_id, device
        # Features move to the device once; every trial and epoch reuses them.
        self.train_xy = (data.train.features.to(device), data.train.labels.to(device))
        self.val_xy = (data.val.features.to(device), data.val.labels.to(device))

    def __call__(self, trial: optuna.Trial) -> float:
        train_cfg = suggest(trial, self.cfg)
        params = {
            **asdict(train_cfg),
            "image_size": IMAGE_SIZE,
            "backbone": self.data.backbone_id,
            "precision": self.cfg.precision,
            "num_train": len(self.train_xy[1]),
        }
        run_id = self.tracker.start_trial(self.experiment_id, self.parent_id, self.cfg.study, trial.number, params)
        trial.set_user_attr("mlflow_run_id", run_id)
        best: dict = {}
        try:
            self._train(trial, train_cfg, run_id, best)
        except optuna.TrialPruned as exc:
            self._finish(trial, run_id, train_cfg, best, "PRUNED", {"sweep.stop_reason": str(exc) or "pruned"})
            raise
        except TrainingDiverged as exc:
            reason = f"diverged: {exc}"
            self._finish(trial, run_id, train_cfg, best, "PRUNED", {"sweep.stop_reason": reason})
            raise optuna.TrialPruned(reason) from exc
        except Exception as exc:
            message = f"{type(exc).__name__}: {exc}"
            trial.set_user_attr("error", message)
            self.tracker.end_trial(run_id, "FAIL", {"sweep.error": message[:5000]})
            raise
        self._finish(trial, run_id, train_cfg, best, "COMPLETE", {})
        return best["metrics"]["val_acc"]

    def _train(self, trial: optuna.Trial, cfg: TrainConfig, run_id: str, best: dict) -> None:
        set_seed(cfg.seed)
        head = build_head(len(self.data.classes), cfg.size_inner, cfg.dropout).to(self.device)
        optimizer = torch.optim.Adam(trainable_parameters(head), lr=cfg.lr)
        generator = torch.Generator().manual_seed(cfg.seed)
        train_batches = FeatureBatches(*self.train_xy, cfg.batch_size, shuffle=True, generator=generator)
        val_batches = FeatureBatches(*self.val_xy, cfg.batch_size)

        def on_epoch(epoch: int, metrics: dict, model: nn.Module) -> None:
            values = {k: v for k, v in metrics.items() if k != "epoch"}
            self.tracker.log_metrics(run_id, values, step=epoch)
            if not best or metrics["val_acc"] > best["metrics"]["val_acc"]:
                best["metrics"] = dict(metrics)
                best["state_dict"] = copy.deepcopy({k: v.cpu() for k, v in model.state_dict().items()})
            trial.report(metrics["val_acc"], epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at epoch {epoch} (val_acc {metrics['val_acc']:.3f})")

        train_and_evaluate(
            head, optimizer, train_batches, val_batches, nn.CrossEntropyLoss(), cfg.epochs, self.device, on_epoch
        )

    def _finish(self, trial: optuna.Trial, run_id: str, cfg: TrainConfig, best: dict, state: str, tags: dict) -> None:
        """Summary metrics and the best epoch's checkpoint, then close the run with its final state."""
        if best:
            m = best["metrics"]
            summary = {
                "best_epoch": m["epoch"],
                "best_train_acc": m["train_acc"],
                "best_val_acc": m["val_acc"],
                "gap": m["train_acc"] - m["val_acc"],
            }
            for key in ("best_epoch", "train_acc", "val_acc"):
                trial.set_user_attr(key, m[key if key != "best_epoch" else "epoch"])
            self.tracker.log_metrics(run_id, summary)
            self._log_checkpoint(trial.number, run_id, cfg, best)
        self.tracker.end_trial(run_id, state, tags)

    def _log_checkpoint(self, number: int, run_id: str, cfg: TrainConfig, best: dict) -> None:
        payload = {
            "format_version": FORMAT_VERSION,
            "kind": HEAD,
            "state_dict": best["state_dict"],
            "num_classes": len(self.data.classes),
            "classes": list(self.data.classes),
            "size_inner": cfg.size_inner,
            "dropout": cfg.dropout,
            "image_size": IMAGE_SIZE,
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
            "backbone_fingerprint": self.data.backbone_id,
            "config": asdict(cfg),
            "metrics": best["metrics"],
            "study": self.cfg.study,
            "trial": number,
            "mlflow_run_id": run_id,
        }
        with tempfile.TemporaryDirectory() as tmp:
            self.tracker.log_file(run_id, save_checkpoint(payload, Path(tmp) / "head.pt"), "checkpoint")


def finished_count(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def describe_trial(trial: optuna.trial.FrozenTrial, seconds: float) -> str:
    """One progress line per finished trial."""
    lr, size = trial.params.get("lr"), trial.params.get("size_inner")
    val, train = trial.user_attrs.get("val_acc"), trial.user_attrs.get("train_acc")
    scores = f"val_acc {val:.3f}  gap {train - val:+.3f}" if val is not None else "no epoch finished"
    line = (
        f"trial {trial.number:3d}  lr {lr:.2e}  size_inner {size:>4}  {scores}  {trial.state.name:<8}  {seconds:5.1f}s"
    )
    if trial.state == TrialState.FAIL:
        line += f"  ({trial.user_attrs.get('error', 'failed')})"
    return line


def run_trials(study: optuna.Study, objective: Objective, target: int, report: Report) -> tuple[int, list[str]]:
    """Run trials until the study has `target` finished ones. A failing trial is replaced, up to as
    many failures as trials were asked for. Returns (trials finished here, error messages)."""
    quota = target - finished_count(study)
    done, errors = 0, []
    while done < quota and len(errors) < max(quota, 1):
        running = len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
        if finished_count(study) + running >= target:
            break  # other workers are finishing the rest
        started = time.perf_counter()
        ran: list[optuna.trial.FrozenTrial] = []
        study.optimize(objective, n_trials=1, catch=(Exception,), callbacks=[lambda _, t, ran=ran: ran.append(t)])
        trial = ran[0]
        report(describe_trial(trial, time.perf_counter() - started))
        if trial.state in FINISHED:
            done += 1
        else:
            errors.append(f"trial {trial.number}: {trial.user_attrs.get('error', 'failed')}")
    return done, errors


@dataclass
class SweepResult:
    study: optuna.Study
    records: list[TrialRecord]
    finished_here: int
    errors: list[str]
    parent_id: str


def run_sweep(cfg: SweepConfig, report: Report) -> SweepResult:
    """Run (or resume) the study to `cfg.trials` finished trials, tracked in MLflow."""
    device = resolve_device(cfg.device)
    tracker = Tracker(cfg.tracking_uri)
    splits = load_splits(cfg.data_dir)  # cheap checks of the data before anything else
    tracker.check_reachable()
    study = open_study(cfg)
    if finished_count(study) >= cfg.trials:
        report(f"study {cfg.study!r} already has {finished_count(study)} finished trials (target {cfg.trials})")
    data = prepare_data(cfg, device, splits)
    experiment_id = tracker.experiment_id(cfg.study)
    parent_params = {
        "data_dir": cfg.data_dir,
        "epochs": cfg.epochs,
        "batch_size": cfg.batch_size,
        "seed": cfg.seed,
        "pruner": cfg.pruner,
        "backbone": data.backbone_id,
        "storage": cfg.storage,
    }
    parent_id = tracker.open_parent(experiment_id, cfg.study, parent_params)
    if data.train.bad_paths or data.val.bad_paths:
        tracker.log_text(parent_id, "\n".join(data.train.bad_paths + data.val.bad_paths), "skipped_images.txt")
    objective = Objective(cfg, data, tracker, experiment_id, parent_id, device)
    status = "FAILED"
    try:
        done, errors = run_trials(study, objective, cfg.trials, report)
        status = "FINISHED"
    finally:
        records = trial_records(study)
        tracker.log_text(parent_id, rows_to_csv(record_rows(records)), "trials.csv")
        tracker.close_parent(parent_id, status)
    return SweepResult(study, records, done, errors, parent_id)
