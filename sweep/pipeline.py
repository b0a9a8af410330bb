"""One sweep, as a straight line: prepare -> stage-1 trials -> stage-2 trial(s) -> publish.

`prepare` checks every input and builds the context the trials share (stores, studies, parent run,
cached data, device) once. `--jobs` workers receive the frozen SweepConfig and the parent run's id,
and only run stage-1 trials; the main process alone opens, publishes and closes the parent run.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import optuna
import torch

from clothing.data import shown
from clothing.engines import resolve_engine
from clothing.extract import resolve_precision
from clothing.model import load_backbone
from sweep.config import SweepConfig
from sweep.data import load_splits, prepare_data
from sweep.export import fetch_head
from sweep.finetune import FinetuneTrial
from sweep.locks import holding, study_lock
from sweep.objective import HeadTrial
from sweep.plots import study_plots
from sweep.select import FINETUNE_STAGE, HEAD_STAGE, TrialRecord, select_winner
from sweep.space import finetune_recipe, resolved_space
from sweep.study import (
    Report,
    count_finished,
    describe_study,
    finetune_study_name,
    latest_trials,
    load_studies,
    make_storage,
    open_study,
    refuse_changed_space,
    resolve_device,
    run_trials,
    trial_records,
)
from sweep.summary import TEST_METRIC, experiment_description, parent_description, parent_metrics
from sweep.sweepfile import SETTINGS, resolved_file
from sweep.table import record_rows, rows_to_csv
from sweep.tracking import NOTE_TAG, Tracker
from sweep.trial import TrackedObjective, TrialContext
from sweep.workers import start_workers

# Stage 2's median pruner prunes from its second finished trial on: a search has only a few trials.
FINETUNE_STARTUP_TRIALS = 1


def quiet_libraries() -> None:
    """Our own one-line-per-trial progress replaces Optuna's and MLflow's INFO chatter."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    # Heartbeats are marked experimental but are Optuna's documented crash-recovery mechanism.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # With a server, MLflow prints "View run ... at: URL" for every run it closes: noise between our
    # lines, and the URL would carry a password given in --tracking-uri.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


@dataclass
class SweepResult:
    records: list[TrialRecord]
    finished_here: int
    errors: list[str]
    parent_id: str


def _stage1_study(cfg: SweepConfig) -> optuna.Study:
    study = open_study(cfg.study, cfg.storage, tracking_uri=cfg.tracking_uri, seed=cfg.seed, pruner=cfg.pruner)
    describe_study(study, cfg, HEAD_STAGE)
    return study


def _context(cfg: SweepConfig, experiment_id: str, parent_id: str, progress: bool) -> TrialContext:
    device = resolve_device(cfg.device)
    splits = load_splits(cfg.data_dir)
    data = prepare_data(cfg, device, splits, progress=progress)
    return TrialContext(cfg, data, Tracker(cfg.tracking_uri), experiment_id, parent_id, device)


def parent_params(cfg: SweepConfig, backbone_id: str) -> dict:
    """The sweep's settings, as params of the parent run (never a store URL: it may hold a password)."""
    return {
        "data_dir": shown(cfg.data_dir),
        "trials": cfg.trials,
        "epochs": cfg.epochs,
        "batch_size": cfg.batch_size,
        "seed": cfg.seed,
        "pruner": cfg.pruner,
        "backbone": backbone_id,
        "search": ",".join(cfg.search) or "-",
        "tolerance": cfg.tolerance,
        **{f"space.{name}": dim.describe() for name, dim in resolved_space(cfg).items()},
        "views": cfg.views,
        "engine": cfg.engine,
        "finetune_blocks": cfg.finetune_blocks,
        "finetune_epochs": cfg.finetune_epochs,
        "finetune_lr": cfg.finetune_lr,
        "finetune_trials": cfg.finetune_trials,
        "finetune_average": cfg.finetune_average,
        "finetune_schedule": cfg.finetune_schedule,
        "finetune_label_smoothing": cfg.finetune_label_smoothing,
        "holdout": f"{cfg.holdout:g} of train/, seed {cfg.holdout_seed}" if cfg.holdout else "none",
    }


def sweep_settings(cfg: SweepConfig) -> dict:
    """The settings a sweep file holds, as this run resolved them (file, then command line)."""
    return {name: getattr(cfg, name) for name in SETTINGS}


def prepare(cfg: SweepConfig, report: Report) -> tuple[TrialContext, optuna.Study]:
    """Check the inputs, cache the data, open the stage-1 study and the parent run.

    Every input a user can get wrong is checked before a study or a run is written, the cheap ones
    first: device, data layout, weights, the two stores (reached, nothing created in them), the cache
    folder, then the images themselves while their features are cached. A refused run records nothing.
    """
    device = resolve_device(cfg.device)
    resolve_engine(cfg.engine, device, resolve_precision(cfg.precision, device))  # a refused engine: before any store
    splits = load_splits(cfg.data_dir)
    backbone = load_backbone(cfg.backbone_weights)
    tracker = Tracker(cfg.tracking_uri)
    tracker.check_reachable()
    storage = make_storage(cfg.storage)  # a wrong URL fails now, not after minutes of extraction
    refuse_changed_space(cfg, storage)  # so does resuming a study with another search space
    cfg.cache_dir.mkdir(parents=True, exist_ok=True)  # a file in its place fails here, in one line
    data = prepare_data(cfg, device, splits, backbone, progress=cfg.progress)
    study = _stage1_study(cfg)
    finished = count_finished(study)
    if finished >= cfg.trials:
        report(f"study {cfg.study!r} already has {finished} finished trials (target {cfg.trials})")
    # Under the study's lock: machines that start together still find (or create) one parent run.
    with holding(study_lock(cfg.storage, cfg.study)):
        experiment_id = tracker.experiment_id(cfg.study)
        parent_id = tracker.open_parent(experiment_id, cfg.study, parent_params(cfg, data.backbone_id))
    tracker.describe_experiment(experiment_id, experiment_description(cfg.study, shown(cfg.data_dir)))
    tracker.log_text(parent_id, resolved_file(sweep_settings(cfg), resolved_space(cfg)), "sweep.yaml")
    tracker.log_lineage(parent_id, data.lineage.splits, data.lineage.tags)
    if data.train.bad_paths or data.val.bad_paths:
        skipped = "\n".join(map(shown, data.train.bad_paths + data.val.bad_paths))
        tracker.log_text(parent_id, skipped, "skipped_images.txt")
    return TrialContext(cfg, data, tracker, experiment_id, parent_id, device), study


def run_stage1(ctx: TrialContext, study: optuna.Study, report: Report, jobs: int) -> tuple[int, list[str]]:
    """Stage-1 trials to `--trials` finished, here and in `jobs - 1` spawned workers."""
    cfg = ctx.cfg
    workers = []
    if jobs > 1:
        workers = start_workers(stage1_worker, (cfg, ctx.experiment_id, ctx.parent_id), jobs - 1)
        torch.set_num_threads(max(1, torch.get_num_threads() // jobs))
    try:
        objective = TrackedObjective(ctx, HeadTrial(ctx))
        result = run_trials(study, objective, cfg.trials, cfg.storage, report, HEAD_STAGE)
        for worker in workers:
            worker.join()
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.terminate()
                worker.join()
    return result


def stage1_worker(cfg: SweepConfig, experiment_id: str, parent_id: str, threads: int) -> None:
    """A `--jobs` worker (a spawned process): stage-1 trials only, on the main process's parent run."""
    quiet_libraries()
    torch.set_num_threads(threads)
    report = print if cfg.progress else (lambda _: None)
    ctx = _context(cfg, experiment_id, parent_id, progress=False)  # the main process cached the data
    study = _stage1_study(cfg)
    run_trials(study, TrackedObjective(ctx, HeadTrial(ctx)), cfg.trials, cfg.storage, report, HEAD_STAGE)
    sys.stdout.flush()


def run_stage2(ctx: TrialContext, records: list[TrialRecord], report: Report) -> tuple[int, list[str]]:
    """Fine-tune the stage-1 winner, as `finetune_trials` trials of the stage-2 study, once per
    (source, recipe): a re-run adds only the trials a recipe is missing."""
    cfg = ctx.cfg
    if not cfg.finetune_blocks:
        return 0, []
    source = select_winner([r for r in records if r.stage == HEAD_STAGE], cfg.tolerance)
    if source is None:
        report("stage 2 skipped: no COMPLETE stage-1 trial to fine-tune")
        return 0, []
    recipe = finetune_recipe(cfg, source)
    study = open_study(
        finetune_study_name(cfg.study),
        cfg.storage,
        tracking_uri=cfg.tracking_uri,
        seed=cfg.seed,
        pruner=cfg.pruner,
        fixed_params=recipe,
        startup_trials=FINETUNE_STARTUP_TRIALS,
    )
    describe_study(study, cfg, FINETUNE_STAGE)

    def of_this_recipe(trial: optuna.trial.FrozenTrial) -> bool:
        return all(trial.params.get(k) == v for k, v in recipe.items())

    if count_finished(study, of_this_recipe) >= cfg.finetune_trials:
        report(f"stage 2: {source.name} was already fine-tuned with this recipe")
        return 0, []
    if cfg.finetune_trials == 1:
        report(f"stage 2: fine-tuning {source.name}'s last {cfg.finetune_blocks} block(s), lr {cfg.finetune_lr:.1e}")
    else:
        enqueue_block_counts(study, cfg, recipe)
        blocks = f"1-{cfg.finetune_blocks}"
        report(f"stage 2: {cfg.finetune_trials} trials fine-tuning {source.name}'s last {blocks} block(s)")
    task = FinetuneTrial(ctx, source, fetch_head(ctx.tracker, source))
    objective = TrackedObjective(ctx, task)
    return run_trials(study, objective, cfg.finetune_trials, cfg.storage, report, FINETUNE_STAGE, of_this_recipe)


def enqueue_block_counts(study: optuna.Study, cfg: SweepConfig, recipe: dict) -> None:
    """A search's block counts, cycled deepest first (3, 2, 1, 3, ...), so that even two trials try
    two depths where random draws could repeat one; the lr is sampled. A count that a trial of this
    recipe already has (finished, running or still queued) is not queued again, so a resumed search
    goes on with the cycle."""
    depths = range(cfg.finetune_blocks, 0, -1)
    wanted = Counter(depths[i % len(depths)] for i in range(cfg.finetune_trials))

    def planned(trial: optuna.trial.FrozenTrial) -> dict:  # a queued trial's params are still in its plan
        return {**trial.system_attrs.get("fixed_params", {}), **trial.params}

    have = Counter(
        planned(t).get("finetune_blocks")
        for t in latest_trials(study)
        if t.state != optuna.trial.TrialState.FAIL and all(planned(t).get(k) == v for k, v in recipe.items())
    )
    for blocks, count in (wanted - have).items():
        for _ in range(count):
            study.enqueue_trial({**recipe, "finetune_blocks": blocks})


def all_records(cfg: SweepConfig) -> list[TrialRecord]:
    return trial_records(*load_studies(cfg.study, cfg.storage))


def publish_study(tracker: Tracker, parent_id: str, study: str, storage: str, tolerance: float) -> list[TrialRecord]:
    """Refresh the parent run: its summary (metrics, description), trials.csv and the study plots,
    the winner marked under `tolerance`; returns the records they show."""
    stage1, stage2 = load_studies(study, storage)
    records = trial_records(stage1, stage2)
    winner = select_winner(records, tolerance)
    summarise_parent(tracker, parent_id, records, winner, tolerance, stage1.user_attrs)
    tracker.log_text(parent_id, rows_to_csv(record_rows(records, winner)), "trials.csv")
    with tempfile.TemporaryDirectory() as tmp:
        for path in study_plots(stage1, records, tolerance, winner, Path(tmp)):
            tracker.log_file(parent_id, path, "plots")
    return records


def summarise_parent(
    tracker: Tracker,
    parent_id: str,
    records: list[TrialRecord],
    winner: TrialRecord | None,
    tolerance: float,
    stage1_attrs: dict,
) -> None:
    """The parent run's metrics and description, so its collapsed row in MLflow says what happened.
    The winner's test score is the one `best` logged on the winner's own run, if any."""
    test_acc = tracker.latest_metrics(winner.run_id).get(TEST_METRIC) if winner and winner.run_id else None
    tracker.log_metrics(parent_id, parent_metrics(records, winner, test_acc))
    description = parent_description(records, winner, tolerance, stage1_attrs, test_acc)
    tracker.set_tags(parent_id, {NOTE_TAG: description})


def run_sweep(cfg: SweepConfig, report: Report, jobs: int = 1) -> SweepResult:
    """Run (or resume) the study: prepare -> stage 1 -> stage 2 -> publish.

    Everything that can fail on bad input (data folders, tracking store, images) is checked before
    the first trial. The parent run stays RUNNING until this process has published the result.
    """
    ctx, study = prepare(cfg, report)
    status = "KILLED"
    try:
        with ctx.tracker.system_metrics(ctx.parent_id, cfg.system_metrics):
            done, errors = run_stage1(ctx, study, report, jobs)
            done2, errors2 = run_stage2(ctx, all_records(cfg), report)
        status = "FINISHED"
    finally:
        records = publish_study(ctx.tracker, ctx.parent_id, cfg.study, cfg.storage, cfg.tolerance)
        ctx.tracker.close_parent(ctx.parent_id, status)
    return SweepResult(records, done + done2, errors + errors2, ctx.parent_id)
