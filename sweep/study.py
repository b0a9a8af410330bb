"""The Optuna side of a sweep: storage, sampler, pruner and the trial loop.

Storage mechanics: the default is SQLite with heartbeats (a crashed trial goes stale and is failed
and replaced) and a 60 s busy timeout (writers queue rather than fail with "database is locked");
workers on one machine also share a file lock around creating trials, so the target is met exactly.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import optuna
import torch
from optuna.trial import TrialState

from sweep.config import SweepConfig
from sweep.data import load_splits, prepare_data
from sweep.finetune import HEAD_STAGE, finetune_winner
from sweep.objective import Objective
from sweep.plots import study_plots
from sweep.select import DEFAULT_TOLERANCE, TrialRecord, select_winner
from sweep.tracking import Tracker, rows_to_csv
from sweep.workers import FileLock, lock_path, start_workers

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
# A trial whose process died stops sending heartbeats; after the grace period the next worker to
# look marks it FAIL (and our callback closes its MLflow run). Short enough that a resume right
# after a crash finds it soon, long enough that a busy worker never looks dead.
HEARTBEAT_SECONDS = int(os.environ.get("SWEEP_HEARTBEAT_SECONDS", "5"))
GRACE_SECONDS = 4 * HEARTBEAT_SECONDS

RDB_SCHEMES = ("sqlite", "postgresql", "mysql")  # the storages with heartbeats (RDBStorage)

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
    if url.startswith(RDB_SCHEMES):
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
            stage=t.user_attrs.get("stage", HEAD_STAGE),
            source_trial=t.user_attrs.get("source_trial"),
        )
        for t in study.get_trials(deepcopy=False)
    ]


def record_rows(records: list[TrialRecord], winner: TrialRecord | None = None) -> list[dict]:
    """Flat rows for tables and CSV/JSON files."""
    return [
        {
            "winner": winner is not None and r.number == winner.number,
            "number": r.number,
            "stage": r.stage,
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


def _count(study: optuna.Study, states) -> int:
    """Sweep trials in `states`; a stage-2 trial does not count towards the target."""
    trials = study.get_trials(deepcopy=False, states=states)
    return sum(t.user_attrs.get("stage", HEAD_STAGE) == HEAD_STAGE for t in trials)


def run_trials(
    study: optuna.Study, objective: Objective, cfg: SweepConfig, report: Report, heartbeat: bool
) -> tuple[int, list[str]]:
    """Run trials until the study has `cfg.trials` finished ones.

    With heartbeats, trials RUNNING elsewhere are waited for rather than counted as done: another
    worker's usually finish, and a crashed worker's go stale when their heartbeat stops and are then
    failed and replaced. Counting and creating a trial happen under one lock, so workers on this
    machine never overshoot the target. A failing trial is replaced, up to as many failures as
    trials were missing. Returns (trials finished by this process, error messages).
    """
    lock = FileLock(lock_path(cfg.storage))
    allowed_failures = max(cfg.trials - _count(study, FINISHED), 1)
    done, errors = 0, []
    while len(errors) < allowed_failures:
        ran: list[optuna.trial.FrozenTrial] = []
        lock.acquire()
        try:
            optuna.storages.fail_stale_trials(study)
            finished = _count(study, FINISHED)
            running = _count(study, (TrialState.RUNNING,)) if heartbeat else 0
            if finished >= cfg.trials:
                break
            if finished + running >= cfg.trials:
                lock.release()
                time.sleep(HEARTBEAT_SECONDS / 2)
                continue
            started = time.perf_counter()
            objective.on_start = lock.release  # the trial exists in the storage: others may count it
            study.optimize(objective, n_trials=1, catch=(Exception,), callbacks=[lambda _, t, ran=ran: ran.append(t)])
        finally:
            lock.release()
            objective.on_start = None
        trial = ran[0]
        report(describe_trial(trial, time.perf_counter() - started))
        if trial.state in FINISHED:
            done += 1
        else:
            errors.append(f"trial {trial.number}: {trial.user_attrs.get('error', 'failed')}")
    return done, errors


def publish_study(
    tracker: Tracker, parent_id: str, study: optuna.Study, records: list[TrialRecord], tolerance: float
) -> None:
    """Refresh the parent run's trials.csv and study plots, the winner marked under `tolerance`."""
    winner = select_winner(records, tolerance)
    tracker.log_text(parent_id, rows_to_csv(record_rows(records, winner)), "trials.csv")
    with tempfile.TemporaryDirectory() as tmp:
        for path in study_plots(study, records, tolerance, winner, Path(tmp)):
            tracker.log_file(parent_id, path, "plots")


@dataclass
class SweepResult:
    records: list[TrialRecord]
    finished_here: int
    errors: list[str]
    parent_id: str


def run_sweep(cfg: SweepConfig, report: Report, jobs: int = 1) -> SweepResult:
    """Run (or resume) the study to `cfg.trials` finished trials, tracked in MLflow.

    Everything that can fail on bad input (data folders, tracking store, images) is checked before
    the first trial. With `jobs > 1`, features are extracted here once, then `jobs - 1` worker
    processes join this one on the same study.
    """
    device = resolve_device(cfg.device)
    tracker = Tracker(cfg.tracking_uri)
    splits = load_splits(cfg.data_dir)
    tracker.check_reachable()
    study = open_study(cfg)
    finished = _count(study, FINISHED)
    if finished >= cfg.trials:
        report(f"study {cfg.study!r} already has {finished} finished trials (target {cfg.trials})")
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
    workers = start_workers(cfg, jobs - 1) if jobs > 1 else []
    if workers:
        torch.set_num_threads(max(1, torch.get_num_threads() // jobs))
    objective = Objective(cfg, data, tracker, experiment_id, parent_id, device)
    status = "KILLED"
    try:
        done, errors = run_trials(study, objective, cfg, report, heartbeat=cfg.storage.startswith(RDB_SCHEMES))
        for worker in workers:
            worker.wait()
        if cfg.finetune_blocks and not cfg.worker:
            records = trial_records(study)
            finetune_winner(cfg, data, study, records, tracker, experiment_id, parent_id, device, report)
        status = "FINISHED"
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.terminate()
        records = trial_records(study)
        publish_study(tracker, parent_id, study, records, DEFAULT_TOLERANCE)
        tracker.close_parent(parent_id, status)
    return SweepResult(records, done, errors, parent_id)
