"""One sweep, as a straight line: prepare -> stage-1 trials -> stage-2 trial(s) -> publish.

`sweep.session.prepare` checks every input and opens the session the steps share (one storage, both
studies, the tracker, the parent run, the cached data). `--jobs` workers receive the frozen
SweepConfig and the parent run, open their own session, and only run stage-1 trials; the main
process alone publishes and closes the parent run.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections import Counter
from dataclasses import dataclass

import optuna
import torch

from clothing.extract import resolve_training_precision
from sweep.config import SweepConfig
from sweep.finetune import FinetuneTrial
from sweep.objective import HeadTrial
from sweep.publish import publish
from sweep.ranking import Ranking, rank
from sweep.refit import run_refit
from sweep.select import TrialRecord
from sweep.session import Session, close_orphaned_runs, open_worker_session, prepare
from sweep.space import finetune_recipe, of_recipe
from sweep.study import Report, Studies, count_finished, latest_trials, pin_params, run_trials
from sweep.table import format_number
from sweep.tracking import ParentRun, browse_hint
from sweep.trial import TrackedObjective
from sweep.workers import start_workers


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
    ranking: Ranking  # what `run`'s closing table shows: the same as the parent run's and `best`'s
    finished_here: int
    errors: list[str]
    parent_id: str
    browse: str  # how to see the runs (tracking.browse_hint)


def run_stage1(session: Session) -> tuple[int, list[str]]:
    """Stage-1 trials to `--trials` finished, here and in `jobs - 1` spawned workers."""
    cfg, jobs = session.cfg, session.cfg.jobs
    workers = []
    if jobs > 1:
        workers = start_workers(stage1_worker, (cfg, session.parent), jobs - 1)
        torch.set_num_threads(max(1, torch.get_num_threads() // jobs))
    try:
        result = _stage1_trials(session)
        for worker in workers:
            worker.join()
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.terminate()
                worker.join()
    return result


def _stage1_trials(session: Session) -> tuple[int, list[str]]:
    study = session.studies.stage1
    objective = TrackedObjective(session, HeadTrial(session))
    return run_trials(study, objective, session.cfg.trials, session.lock(study), session.report)


def stage1_worker(cfg: SweepConfig, parent: ParentRun, threads: int) -> None:
    """A `--jobs` worker (a spawned process): stage-1 trials only, on the main process's parent run."""
    quiet_libraries()
    torch.set_num_threads(threads)
    _stage1_trials(open_worker_session(cfg, parent, print if cfg.progress else (lambda _: None)))
    sys.stdout.flush()


def run_stage2(session: Session) -> tuple[int, list[str]]:
    """Fine-tune the stage-1 winner (and with `finetune_sources` > 1 the next best trials too), as
    `finetune_trials` trials of the stage-2 study each, once per (source, recipe): a re-run adds only
    the trials a recipe is missing."""
    cfg, study, report = session.cfg, session.studies.stage2, session.report
    if study is None:
        return 0, []
    sources = stage2_sources(rank(Studies(session.studies.stage1), cfg.tolerance), cfg.finetune_sources)
    if not sources:
        report("stage 2 skipped: no COMPLETE stage-1 trial to fine-tune")
        return 0, []
    precision = resolve_training_precision(cfg.finetune_precision, cfg.precision, session.device)
    done, errors = 0, []
    for source in sources:
        finished, failed = fine_tune(session, study, source, precision)
        done, errors = done + finished, errors + failed
    return done, errors


def stage2_sources(ranking: Ranking, count: int) -> list[TrialRecord]:
    """The stage-1 trials stage 2 starts from: the rule's winner, then the other COMPLETE trials by
    val_acc (ties: the smaller gap), `count` in all."""
    if ranking.winner is None:
        return []
    others = [r for r in ranking.records if r.state == "COMPLETE" and r.number != ranking.winner.number]
    others.sort(key=lambda r: (-r.val_acc, r.gap))
    return [ranking.winner, *others][:count]


def fine_tune(session: Session, study: optuna.Study, source: TrialRecord, precision: str) -> tuple[int, list[str]]:
    """Stage 2's trials from one source, unless its recipe already has them all."""
    cfg, report = session.cfg, session.report
    recipe = finetune_recipe(cfg, source, precision)
    pin_params(study, recipe)

    def of_this_recipe(trial: optuna.trial.FrozenTrial) -> bool:
        return of_recipe(trial.params, recipe)

    if count_finished(study, of_this_recipe) >= cfg.finetune_trials:
        report(f"stage 2: {source.name} was already fine-tuned with this recipe")
        return 0, []
    if cfg.finetune_trials == 1:
        decay = f" (x{format_number(cfg.finetune_lr_decay)} a block down)" if cfg.finetune_lr_decay != 1 else ""
        report(
            f"stage 2: fine-tuning {source.name}'s last {cfg.finetune_blocks} block(s), "
            f"lr {format_number(cfg.finetune_lr)}{decay}, {precision}"
        )
    else:
        enqueue_block_counts(study, cfg, recipe)
        blocks = f"1-{cfg.finetune_blocks}"
        report(f"stage 2: {cfg.finetune_trials} trials fine-tuning {source.name}'s last {blocks} block(s)")
    objective = TrackedObjective(session, FinetuneTrial(session, source, session.tracker.fetch_checkpoint(source)))
    return run_trials(study, objective, cfg.finetune_trials, session.lock(study), report, of_this_recipe)


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
        if t.state != optuna.trial.TrialState.FAIL and of_recipe(planned(t), recipe)
    )
    for blocks, count in (wanted - have).items():
        for _ in range(count):
            study.enqueue_trial({**recipe, "finetune_blocks": blocks})


def run_sweep(cfg: SweepConfig, report: Report) -> SweepResult:
    """Run (or resume) the study: prepare -> stage 1 -> stage 2 -> publish.

    Everything that can fail on bad input (data folders, tracking store, images) is checked before
    the first trial. The parent run stays RUNNING until this process has published the result.
    """
    session = prepare(cfg, report)
    status = "KILLED"
    try:
        with session.tracker.system_metrics(session.parent.run_id, cfg.system_metrics):
            done, errors = run_stage1(session)
            done2, errors2 = run_stage2(session)
            if cfg.refit:
                run_refit(session)
        status = "FINISHED"
    finally:
        close_orphaned_runs(session)
        ranking = rank(session.studies, cfg.tolerance)
        publish(session.tracker, session.parent, ranking, session.studies.stage1)
        session.tracker.close_parent(session.parent.run_id, status)
    browse = browse_hint(session.tracker, cfg.study)
    return SweepResult(ranking, done + done2, errors + errors2, session.parent.run_id, browse)
