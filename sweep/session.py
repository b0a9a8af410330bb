"""A sweep session: the state of one sweep in one process, opened once and passed down.

`prepare` checks every input, resolves the device, and opens one Optuna storage (both studies are
opened on it), one `Tracker`, the parent run and the cached data; everything below it receives the
`Session`, never a (study name, storage URL, tolerance) to reopen.
A `--jobs` worker opens its own from the frozen config and the parent run (`open_worker_session`),
as pytorch/examples' `main_worker` builds its state once from its arguments.
"""

from __future__ import annotations

from dataclasses import dataclass

import optuna
import torch
from optuna.trial import TrialState

from clothing.data import shown
from clothing.engines import resolve_engine
from clothing.extract import resolve_precision
from clothing.model import load_backbone
from sweep.config import SweepConfig, parent_params
from sweep.data import SweepData, load_splits, prepare_data
from sweep.locks import StudyLock, holding, study_lock
from sweep.outages import STALE_REASON, OutageTolerantStorage, ride_out_tracking_outages
from sweep.select import FINETUNE_STAGE, HEAD_STAGE
from sweep.space import resolved_space
from sweep.study import (
    Report,
    Studies,
    count_finished,
    describe_study,
    finetune_study_name,
    latest_trials,
    make_storage,
    open_study,
    refuse_changed_space,
    resolve_device,
)
from sweep.summary import experiment_description
from sweep.sweepfile import resolved_file
from sweep.tracking import ParentRun, Tracker

# Stage 2's median pruner prunes from its second finished trial on: a search has only a few trials.
FINETUNE_STARTUP_TRIALS = 1


@dataclass
class Session:
    """What every step of a sweep shares in this process."""

    cfg: SweepConfig
    studies: Studies  # both opened on the one storage of this process
    tracker: Tracker
    parent: ParentRun
    data: SweepData
    device: torch.device
    report: Report

    def lock(self, study: optuna.Study) -> StudyLock:
        """The lock that guards `study`'s trial count, shared by every worker on any machine."""
        lock = study_lock(self.cfg.storage, study.study_name)
        lock.ride_out_outages(self.cfg.outage_seconds)
        return lock


def _storage(cfg: SweepConfig, tracker: Tracker) -> optuna.storages.BaseStorage:
    def close_stale_run(_study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        """A trial whose worker died (no heartbeat) gets its MLflow run closed as FAILED: the run its
        id names, or one the worker created and died before naming."""
        stage = trial.user_attrs.get("stage", HEAD_STAGE)
        run_id = trial.user_attrs.get("mlflow_run_id")
        run_id = run_id or tracker.running_trials(cfg.study, stage, trial.number).get(trial.number)
        if run_id:
            tracker.end_trial(run_id, "FAIL", STALE_REASON)

    storage = make_storage(cfg.storage, close_stale_run)
    # Reached: from now on a lost connection is waited out (sweep.outages), and so is the tracking server.
    if isinstance(storage, OutageTolerantStorage):
        storage.ride_out_outages(cfg.outage_seconds)
    ride_out_tracking_outages(cfg.outage_seconds)
    return storage


def close_orphaned_runs(session: Session) -> None:
    """Close the trial runs still RUNNING in MLflow whose Optuna trial has failed. A worker that fails
    a stale trial writes the FAIL first and closes the run after; killed in between, it leaves such a
    run, which no stale check will see again (as does a failing trial whose own closing call failed).
    The next sweep to finish closes it, with the trial's reason."""
    stages = [(HEAD_STAGE, session.studies.stage1), (FINETUNE_STAGE, session.studies.stage2)]
    for stage, study in stages:
        running = session.tracker.running_trials(session.cfg.study, stage) if study is not None else {}
        if not running:
            continue
        failed = {t.number: t for t in latest_trials(study) if t.state == TrialState.FAIL}
        for number, run_id in running.items():
            if number in failed:
                session.tracker.end_trial(run_id, "FAIL", failed[number].user_attrs.get("error", STALE_REASON))


def _stage2_study(cfg: SweepConfig, storage: optuna.storages.BaseStorage) -> optuna.Study | None:
    if not cfg.finetune_blocks:
        return None
    study = open_study(storage, finetune_study_name(cfg.study), cfg, startup_trials=FINETUNE_STARTUP_TRIALS)
    describe_study(study, cfg, FINETUNE_STAGE)
    return study


def prepare(cfg: SweepConfig, report: Report) -> Session:
    """Check the inputs, cache the data, open the studies and the parent run.

    Every input a user can get wrong is checked before a study or a run is written, the cheap ones
    first: device, data layout, weights, the two stores (reached, nothing created in them), the cache
    folder, then the images themselves while their features are cached. A refused run records nothing.
    """
    device = resolve_device(cfg.device)
    resolve_engine(cfg.engine, device, resolve_precision(cfg.precision, device))  # a refused engine: before any store
    splits = load_splits(cfg.data_dir, cfg.image_size)
    backbone = load_backbone(cfg.backbone_weights)
    tracker = Tracker(cfg.tracking_uri)
    tracker.check_reachable()
    storage = _storage(cfg, tracker)  # a wrong URL fails now, not after minutes of extraction
    existing = open_study(storage, cfg.study, cfg, create=False)
    refuse_changed_space(cfg, existing)  # so does resuming a study with another search space
    cfg.cache_dir.mkdir(parents=True, exist_ok=True)  # a file in its place fails here, in one line
    data = prepare_data(cfg, device, splits, backbone, progress=cfg.progress)
    stage1 = existing or open_study(storage, cfg.study, cfg)
    describe_study(stage1, cfg, HEAD_STAGE)
    finished = count_finished(stage1)
    if finished >= cfg.trials:
        report(f"study {cfg.study!r} already has {finished} finished trials (target {cfg.trials})")
    # Under the study's lock: machines that start together still find (or create) one parent run.
    with holding(study_lock(cfg.storage, cfg.study)):
        experiment_id = tracker.experiment_id(cfg.study)
        params = {**parent_params(cfg), "backbone": data.backbone_id}
        params |= {f"space.{name}": dim.describe() for name, dim in resolved_space(cfg).items()}
        parent = ParentRun(experiment_id, tracker.open_parent(experiment_id, cfg.study, params), cfg.study)
    tracker.describe_experiment(experiment_id, experiment_description(cfg.study, shown(cfg.data_dir)))
    tracker.log_text(parent.run_id, resolved_file(cfg, resolved_space(cfg)), "sweep.yaml")
    tracker.log_lineage(parent.run_id, data.lineage.splits, data.lineage.tags)
    if data.train.bad_paths or data.val.bad_paths:
        skipped = "\n".join(map(shown, data.train.bad_paths + data.val.bad_paths))
        tracker.log_text(parent.run_id, skipped, "skipped_images.txt")
    studies = Studies(stage1, _stage2_study(cfg, storage))
    return Session(cfg, studies, tracker, parent, data, device, report)


def open_worker_session(cfg: SweepConfig, parent: ParentRun, report: Report) -> Session:
    """A `--jobs` worker's own session: stage 1 only, on the main process's parent run and cache."""
    device = resolve_device(cfg.device)
    tracker = Tracker(cfg.tracking_uri)
    storage = _storage(cfg, tracker)
    splits = load_splits(cfg.data_dir, cfg.image_size)
    data = prepare_data(cfg, device, splits, progress=False)  # the main process cached it
    stage1 = open_study(storage, cfg.study, cfg)
    return Session(cfg, Studies(stage1), tracker, parent, data, device, report)
