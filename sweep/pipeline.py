"""One sweep, top to bottom: prepare -> stage-1 trials -> the stage-2 trial -> publish.

`prepare` checks every input (the cheap ones first) and builds what the sweep shares, once: the
device, the cached data, one Optuna storage with both studies, one `Tracker` and the parent run. Each
step then gets the pieces it uses, as pytorch/examples' `main_worker` builds its state once and hands
each function its part. `--jobs` workers receive the frozen SweepConfig and the parent run, build
their own (`open_worker`), and only run stage-1 trials; the main process alone publishes and closes
the parent run.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
import threading
import warnings
from dataclasses import dataclass

import optuna
import torch
from optuna.trial import TrialState

from clothing.data import shown
from clothing.engines import resolve_engine
from clothing.extract import resolve_precision, resolve_training_precision
from clothing.model import load_backbone
from sweep.config import HOLDOUT_FOLDS, SweepConfig, SweepError, default_tracking_uri, resolve_device
from sweep.data import SweepData, load_splits, prepare_data
from sweep.objective import FinetuneTrial, HeadTrial, Stage2Recipe, TrackedObjective, stage2_recipe
from sweep.ranking import FINETUNE_STAGE, HEAD_STAGE, Ranking, rule_text
from sweep.space import describe
from sweep.storage import STALE_REASON
from sweep.stores import holding, ride_out_tracking_outages
from sweep.study import Report, Studies, TrialLoop, count_finished, make_storage, open_study, pin_params, run_trials
from sweep.tracking import (
    ParentRun,
    Tracker,
    browse_hint,
    describe_experiment,
    log_lineage,
    publish,
    system_metrics,
)


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
class Sweep:
    """What every step of one sweep shares in this process, built once."""

    cfg: SweepConfig
    studies: Studies  # both opened on the one storage of this process
    tracker: Tracker
    parent: ParentRun
    data: SweepData
    device: torch.device
    report: Report


@dataclass
class SweepResult:
    ranking: Ranking  # what `run`'s closing table shows: the same as the parent run's and `best`'s
    finished_here: int
    errors: list[str]
    browse: str  # how to see the runs (tracking.browse_hint)


def run_sweep(cfg: SweepConfig, report: Report) -> SweepResult:
    """Run (or resume) the study: prepare -> stage 1 -> stage 2 -> publish.

    Everything that can fail on bad input (data folders, stores, images) is checked before the first
    trial. The parent run stays RUNNING until this process has published the result.
    """
    sweep = prepare(cfg, report)
    status = "KILLED"
    try:
        with system_metrics(sweep.tracker, sweep.parent.run_id):
            done, errors = run_stage1(sweep)
            done2, errors2 = run_stage2(sweep)
        status = "FINISHED"
    finally:
        close_orphaned_runs(sweep)
        ranking = sweep.studies.rank(cfg.stage1.tolerance)
        publish(sweep.tracker, sweep.parent, ranking, sweep.studies.stage1)
        sweep.tracker.close_parent(sweep.parent.run_id, status)
    browse = browse_hint(sweep.tracker, cfg.stores.study, cfg.stores.tracking_uri == default_tracking_uri())
    return SweepResult(ranking, done + done2, errors + errors2, browse)


def prepare(cfg: SweepConfig, report: Report) -> Sweep:
    """Check the inputs, cache the data, open the studies and the parent run.

    Every input a user can get wrong is checked before a study or a run is written, the cheap ones
    first: device, engine, data layout, weights, the two stores (reached, nothing created in them), a
    changed search space, the cache folder, then the images themselves while their features are
    cached. A refused run records nothing.
    """
    stores, data_settings = cfg.stores, cfg.data
    device = resolve_device(data_settings.device)
    resolve_engine(data_settings.engine, device, resolve_precision(data_settings.precision, device))
    splits = load_splits(data_settings.data_dir, data_settings.image_size)
    backbone = load_backbone(data_settings.backbone_weights)
    tracker = Tracker(stores.tracking_uri)
    tracker.check_reachable()
    storage = make_storage(stores.storage, stores.outage_seconds, close_stale_run(tracker, stores.study))
    ride_out_tracking_outages(stores.outage_seconds)  # reached: from now on the tracking server is waited out
    existing = open_study(storage, stores.study, cfg.stage1, create=False)
    refuse_changed_space(cfg, existing)  # a wrong URL or a changed space fails now, not after the extraction
    data_settings.cache_dir.mkdir(parents=True, exist_ok=True)  # a file in its place fails here, in one line
    data = prepare_data(data_settings, cfg.stage2.finetune_blocks, device, splits, backbone, progress=not cfg.quiet)
    stage1 = existing or open_study(storage, stores.study, cfg.stage1)
    describe_study(stage1, cfg, HEAD_STAGE)
    finished = count_finished(Studies(storage, stage1).latest(stage1))
    if finished >= cfg.stage1.trials:
        report(f"study {stores.study!r} already has {finished} finished trials (target {cfg.stage1.trials})")
    # Under the study's lock: machines that start together still find (or create) one parent run.
    with holding(stores.lock()):
        experiment_id = tracker.experiment_id(stores.study)
        parent_id = tracker.open_parent(experiment_id, stores.study, {**cfg.params(), "backbone": data.backbone_id})
    parent = ParentRun(experiment_id, parent_id, stores.study)
    describe_experiment(tracker, experiment_id, experiment_description(stores.study, shown(data_settings.data_dir)))
    tracker.log_text(parent.run_id, cfg.resolved_file(), "sweep.yaml")
    log_lineage(tracker, parent.run_id, data.lineage.splits, data.lineage.tags)
    if data.train.bad_paths or data.val.bad_paths:
        skipped = "\n".join(map(shown, data.train.bad_paths + data.val.bad_paths))
        tracker.log_text(parent.run_id, skipped, "skipped_images.txt")
    stage2 = None
    if cfg.stage2.finetune_blocks:
        # Never pruned: its trials are other recipes or sources (a make sweep, then the thorough file), and
        # a median of another recipe's curve would stop one for good (a PRUNED trial never wins);
        # --finetune-patience is what stops a stage 2 that no longer improves.
        stage2 = open_study(storage, stores.finetune_study, cfg.stage1, prune=False)
        describe_study(stage2, cfg, FINETUNE_STAGE)
    return Sweep(cfg, Studies(storage, stage1, stage2), tracker, parent, data, device, report)


def close_stale_run(tracker: Tracker, study: str):
    """Optuna's callback for a trial whose worker died (no heartbeat): close its MLflow run as FAILED,
    the run its id names, or one the worker created and died before naming."""

    def close(_study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        stage = trial.user_attrs.get("stage", HEAD_STAGE)
        run_id = trial.user_attrs.get("mlflow_run_id")
        run_id = run_id or tracker.running_trials(study, stage, trial.number).get(trial.number)
        if run_id:
            tracker.end_trial(run_id, "FAIL", STALE_REASON)

    return close


def open_worker(cfg: SweepConfig, parent: ParentRun, report: Report) -> Sweep:
    """A `--jobs` worker's own state: stage 1 only, on the main process's parent run and cache. The
    main process has reached both stores, so an outage met here is waited out like any later one."""
    stores, data_settings = cfg.stores, cfg.data
    device = resolve_device(data_settings.device)
    ride_out_tracking_outages(stores.outage_seconds)
    tracker = Tracker(stores.tracking_uri)
    on_stale = close_stale_run(tracker, stores.study)
    storage = make_storage(stores.storage, stores.outage_seconds, on_stale, reached=True)
    splits = load_splits(data_settings.data_dir, data_settings.image_size)
    backbone = load_backbone(data_settings.backbone_weights)
    data = prepare_data(data_settings, cfg.stage2.finetune_blocks, device, splits, backbone, progress=False)
    stage1 = open_study(storage, stores.study, cfg.stage1)
    return Sweep(cfg, Studies(storage, stage1), tracker, parent, data, device, report)


def experiment_description(study: str, data_dir: str) -> str:
    return (
        f"Optuna study **{study}**: a hyperparameter sweep of a classifier head on a frozen ImageNet "
        f"MobileNetV2, on the images of `{data_dir}`. One parent run for the study (named `{study}`), one "
        "nested run per trial (`trial-NNN`; stage 2: `finetune-NNN`). Per-epoch curves are `train_loss`, "
        "`train_acc`, `val_loss`, `val_acc` at step = epoch; single values at a trial's best epoch are "
        "`best/...`. The winner is tagged `sweep.winner = true`."
    )


def space_signature(cfg: SweepConfig) -> dict:
    """Stage 1's space as data, and the held-out part of train/ and the image size if not 224: a
    resumed study must sample from the same space and train on the same images, seen at the same size
    (a study from before `image_size` existed resumes at 224)."""
    signature = {dim.name: dim.as_dict() for dim in sorted(cfg.stage1.space, key=lambda d: d.name)}
    if cfg.data.holdout_fold:
        signature["holdout"] = {"fold": cfg.data.holdout_fold, "of": HOLDOUT_FOLDS}
    if cfg.data.image_size != 224:
        signature["image_size"] = cfg.data.image_size
    return signature


def refuse_changed_space(cfg: SweepConfig, study: optuna.Study | None) -> None:
    """A study resumes only with the space it sampled from: stop before any work if it differs."""
    recorded = study.user_attrs.get("space") if study is not None else None
    wanted = space_signature(cfg)
    if recorded is not None and recorded != wanted:
        changed = sorted(k for k in recorded.keys() | wanted.keys() if recorded.get(k) != wanted.get(k))
        differ = {k: recorded.get(k) for k in changed}
        raise SweepError(
            f"study {cfg.stores.study!r} was run with another search space, held-out split or image size "
            f"({', '.join(changed)} differ: recorded {differ}); resume it with the same space, or pass "
            "--study NEW_NAME to start a new study with this one"
        )


def describe_study(study: optuna.Study, cfg: SweepConfig, stage: str) -> None:
    """User attrs that say what the study is, in optuna-dashboard and anywhere else it is read."""
    stage1, stage2 = cfg.stage1, cfg.stage2
    study.set_user_attr("rule", rule_text(stage1.tolerance))
    study.set_user_attr("tolerance", stage1.tolerance)
    study.set_user_attr("objective", "maximize val_acc at the trial's best epoch (reported every epoch)")
    stages = {HEAD_STAGE: f"stage 1: a head on frozen features ({cfg.stores.study})"}
    if stage2.finetune_blocks:
        stages[FINETUNE_STAGE] = (
            f"stage 2: the stage-1 winner's last {stage2.finetune_blocks} block(s) fine-tuned, lr "
            f"{stage2.finetune_lr:g}, at most {stage2.finetune_epochs} epochs ({cfg.stores.finetune_study})"
        )
    study.set_user_attr("stages", stages)
    study.set_user_attr("stage", stage)
    if stage == HEAD_STAGE:
        fixed = {"epochs": stage1.epochs, "batch_size": stage1.batch_size, "views": cfg.data.views}
        study.set_user_attr("search_space", {"stage1": {"searched": describe(stage1.space), "fixed": fixed}})
        study.set_user_attr("space", space_signature(cfg))  # what refuse_changed_space compares
    else:
        recipe = {name: getattr(stage2, name) for name in ("finetune_blocks", "finetune_lr", "finetune_epochs")}
        study.set_user_attr("search_space", {"source_trial": "the stage-1 winner", **recipe})


def run_stage1(sweep: Sweep) -> tuple[int, list[str]]:
    """Stage-1 trials to `--trials` finished, here and in `jobs - 1` spawned workers. A worker that
    stops on an error says why in one `Error:` line, printed here as it arrives; the others (and this
    process) still reach the target."""
    jobs = sweep.cfg.stage1.jobs
    if jobs == 1:
        return stage1_trials(sweep)
    # Spawned, not forked: a fresh interpreter gets the frozen config as an object (pickled), and
    # never inherits this process's open database connections or torch thread pools.
    threads = max(1, (os.cpu_count() or 1) // jobs)
    context = multiprocessing.get_context("spawn")
    errors = context.SimpleQueue()
    workers = [
        context.Process(target=stage1_worker, args=(sweep.cfg, sweep.parent, threads, number, errors))
        for number in range(1, jobs)
    ]
    printer = threading.Thread(target=print_worker_errors, args=(errors,), daemon=True)
    printer.start()
    for worker in workers:
        worker.start()
    torch.set_num_threads(max(1, torch.get_num_threads() // jobs))
    try:
        result = stage1_trials(sweep)
        for worker in workers:
            worker.join()
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.terminate()
                worker.join()
        errors.put(None)
        printer.join()
    return result


def print_worker_errors(errors) -> None:
    for message in iter(errors.get, None):
        print(f"Error: {message}", file=sys.stderr, flush=True)


def stage1_trials(sweep: Sweep) -> tuple[int, list[str]]:
    cfg, study = sweep.cfg, sweep.studies.stage1
    task = HeadTrial(sweep.data, sweep.device, cfg.stage1, cfg.data.precision)
    objective = TrackedObjective(task, sweep.tracker, sweep.parent, sweep.data)
    lock = cfg.stores.lock(outage_seconds=cfg.stores.outage_seconds)
    return run_trials(TrialLoop(sweep.studies, study, objective, cfg.stage1.trials, lock), sweep.report)


def stage1_worker(cfg: SweepConfig, parent: ParentRun, threads: int, number: int, errors) -> None:
    """A `--jobs` worker (a spawned process): stage-1 trials only, on the main process's parent run.
    An error goes to the main process as one line (`errors`), not as multiprocessing's traceback."""
    quiet_libraries()
    torch.set_num_threads(threads)
    try:
        stage1_trials(open_worker(cfg, parent, (lambda _: None) if cfg.quiet else print))
    except KeyboardInterrupt:
        pass  # Ctrl-C reached the whole process group: the main process reports the interruption
    except Exception as exc:  # noqa: BLE001 - whatever stopped the worker, in one line
        first_line = (str(exc).strip().splitlines() or [""])[0]
        errors.put(f"--jobs worker {number} stopped: {type(exc).__name__}: {first_line}")
        sys.exit(1)
    finally:
        sys.stdout.flush()


def run_stage2(sweep: Sweep) -> tuple[int, list[str]]:
    """Fine-tune the stage-1 winner (the rule over stage 1's trials alone) with the sweep's stage-2
    recipe, as one trial of the stage-2 study, unless that study already has it (a re-run adds nothing)."""
    cfg, study, report = sweep.cfg, sweep.studies.stage2, sweep.report
    if study is None:
        return 0, []
    source = Studies(sweep.studies.storage, sweep.studies.stage1).rank(cfg.stage1.tolerance).winner
    if source is None:
        report("stage 2 skipped: no COMPLETE stage-1 trial to fine-tune")
        return 0, []
    s2 = cfg.stage2
    precision = resolve_training_precision(s2.finetune_precision, cfg.data.precision, sweep.device)
    recipe = stage2_recipe(
        source, s2.finetune_blocks, s2.finetune_lr, s2.finetune_epochs, precision, s2.finetune_patience
    )
    pin_params(study, recipe.pinned(), cfg.stage1.seed)

    def of_this_recipe(trial: optuna.trial.FrozenTrial) -> bool:
        return Stage2Recipe.read(trial.params) == recipe

    if count_finished(sweep.studies.latest(study), of_this_recipe) >= 1:
        report(f"stage 2: {source.name} was already fine-tuned with this recipe")
        return 0, []
    report(recipe.describe(source.name))
    task = FinetuneTrial(
        recipe, sweep.tracker.fetch_checkpoint(source), sweep.data, sweep.device, cfg.stage1, cfg.data.backbone_weights
    )
    objective = TrackedObjective(task, sweep.tracker, sweep.parent, sweep.data)
    lock = cfg.stores.lock(study.study_name, cfg.stores.outage_seconds)
    return run_trials(TrialLoop(sweep.studies, study, objective, 1, lock, of_this_recipe), report)


def close_orphaned_runs(sweep: Sweep) -> None:
    """Close the trial runs still RUNNING in MLflow whose Optuna trial has failed. A worker that fails
    a stale trial writes the FAIL first and closes the run after; killed in between, it leaves such a
    run, which no stale check will see again (as does a failing trial whose own closing call failed).
    The next sweep to finish closes it, with the trial's reason."""
    stages = [(HEAD_STAGE, sweep.studies.stage1), (FINETUNE_STAGE, sweep.studies.stage2)]
    for stage, study in stages:
        running = sweep.tracker.running_trials(sweep.cfg.stores.study, stage) if study is not None else {}
        if not running:
            continue
        failed = {t.number: t for t in sweep.studies.latest(study) if t.state == TrialState.FAIL}
        for number, run_id in running.items():
            if number in failed:
                sweep.tracker.end_trial(run_id, "FAIL", failed[number].user_attrs.get("error", STALE_REASON))
