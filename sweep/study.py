"""The Optuna side of a sweep: the storage, the per-trial-seeded sampler, both stages' studies, their
records and ranking, and the trial loop.

Every RDB storage (SQLite by default, PostgreSQL for several machines) has heartbeats, so a crashed
trial goes stale and is failed and replaced; every worker, on any machine, counts and creates trials
under the study's lock (`sweep.stores`), so the target is met exactly. Stage 2 lives in a study of its
own, `<study>.finetune`, in the same storage: the stage-1 sampler never sees a stage-2 observation,
and each study's trial numbers name its trials (trial-007, finetune-000).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import optuna
from optuna.exceptions import StorageInternalError
from optuna.samplers import BaseSampler, PartialFixedSampler, TPESampler
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.exc import SQLAlchemyError

from clothing.data import shown
from sweep.config import Stage1Settings, Stores, SweepError
from sweep.ranking import FINETUNE_STAGE, HEAD_STAGE, Ranking, TrialRecord, format_params, rank, trial_name
from sweep.storage import GRACE_SECONDS, HEARTBEAT_SECONDS, TAKEN_OVER_REASON, OutageTolerantStorage, latest_trials
from sweep.stores import (
    StorageError,
    StudyLock,
    engine_kwargs,
    holding,
    lost_connection_to,
    mask_url,
    not_utf8,
    retrying,
    storage_error,
    study_lock,
)

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
RDB_SCHEMES = ("sqlite", "postgresql", "mysql")  # the storages with heartbeats (RDBStorage)
LEGACY_TOLERANCE = 0.02  # the rule's band for studies from before the tolerance was recorded

Report = Callable[[str], None]
StaleTrialCallback = Callable[[optuna.Study, FrozenTrial], None]


def trial_seed(seed: int, number: int) -> int:
    """The sampler seed of trial `number`: distinct for every trial of a study, the same on every run."""
    return int(np.random.SeedSequence([seed, number]).generate_state(1)[0])


class TrialSeededSampler(BaseSampler):
    """TPE, seeded per trial from (--seed, trial number).

    One TPESampler(seed) per process would draw the same start-up configurations again in every
    process that opens the study with that seed: a resumed run, a `--jobs` worker, another machine.
    Trial numbers are unique within a study, so seeding each trial's draws from its number never
    repeats a configuration, and an uninterrupted run with a given seed still draws the same sequence.
    TPE keeps nothing between trials but its random state (it reads the history from the study), so
    a fresh TPESampler per trial is the same algorithm.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._per_trial: dict[int, TPESampler] = {}

    def _sampler(self, trial: FrozenTrial) -> TPESampler:
        if trial.number not in self._per_trial:
            self._per_trial[trial.number] = TPESampler(seed=trial_seed(self.seed, trial.number))
        return self._per_trial[trial.number]

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self._sampler(trial).before_trial(study, trial)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict:
        return self._sampler(trial).infer_relative_search_space(study, trial)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial, search_space: dict) -> dict:
        return self._sampler(trial).sample_relative(study, trial, search_space)

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str, distribution) -> object:
        return self._sampler(trial).sample_independent(study, trial, param_name, distribution)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values) -> None:
        self._sampler(trial).after_trial(study, trial, state, values)
        self._per_trial.pop(trial.number, None)


def make_storage(
    url: str, outage_seconds: float = 0, on_stale_trial: StaleTrialCallback | None = None, *, reached: bool = False
) -> optuna.storages.BaseStorage:
    """An Optuna storage with heartbeats, so that a crashed trial does not stay RUNNING forever
    (`on_stale_trial` runs for each one failed that way); from then on its calls wait out a lost
    connection for `outage_seconds`. Built once per process: every study of a sweep is opened on it.

    A first contact (`reached` false: the command line's) fails at once: a storage that cannot be
    opened raises StorageError, which names it (password masked) and the fix. A process whose sweep
    has reached the storage already (a `--jobs` worker the main process spawned) waits out an outage
    here too, as every later call does."""
    if not_utf8(url):
        raise StorageError(f"the Optuna storage {shown(url)} is not valid UTF-8; put it in a folder whose name is")
    database = Stores(storage=url).storage_file
    if database is not None:
        database.parent.mkdir(parents=True, exist_ok=True)
    if not url.startswith(RDB_SCHEMES):
        try:
            return optuna.storages.get_storage(url)
        except (SQLAlchemyError, ImportError, ValueError) as exc:
            raise storage_error(url, exc) from exc
    budget = outage_seconds if reached else 0

    def opened() -> OutageTolerantStorage:
        # Optuna creates its tables on first use; machines that start together on an empty database
        # would race to create them, so they take turns (a lock that needs no table).
        with holding(study_lock(url, "optuna-schema", budget)):
            return OutageTolerantStorage(
                url,
                engine_kwargs=engine_kwargs(url),
                heartbeat_interval=HEARTBEAT_SECONDS,
                grace_period=GRACE_SECONDS,
                heartbeat_stale_trial_callback=on_stale_trial,
            )

    try:
        storage = retrying(opened, f"the Optuna storage {mask_url(url)}", budget, lost_connection_to(url))
    # Optuna wraps an error met mid-session (a connection lost while it checks its tables) in
    # StorageInternalError; storage_error names the driver's error underneath.
    except (SQLAlchemyError, StorageInternalError, ImportError, ValueError) as exc:
        raise storage_error(url, exc) from exc
    storage.marks_trials = True  # every trial of the sweep runs under study.optimize, which beats
    storage.ride_out_outages(outage_seconds)  # reached: from now on a lost connection is waited out
    return storage


def open_study(
    storage: optuna.storages.BaseStorage,
    name: str,
    stage1: Stage1Settings,
    *,
    prune: bool = True,
    create: bool = True,
) -> optuna.Study | None:
    """The study `name` on `storage`, set up for running trials with `stage1`'s seed and, when
    `prune`, its pruner (the median one starts once 5 trials have finished): created when `create`
    (resumed when it exists), else loaded, or None when there is none."""
    sampler = TrialSeededSampler(stage1.seed)
    pruner = (
        optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=2)
        if prune and stage1.pruner == "median"
        else optuna.pruners.NopPruner()
    )
    if not create:
        try:
            return optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)
        except KeyError:
            return None
    study = optuna.create_study(
        study_name=name, storage=storage, direction="maximize", sampler=sampler, pruner=pruner, load_if_exists=True
    )
    study.set_metric_names(["val_acc"])
    return study


def pin_params(study: optuna.Study, fixed_params: dict, seed: int) -> None:
    """From now on, the study's trials take `fixed_params` as they are (stage 2's recipe), in place of
    any recipe pinned before."""
    study.sampler = PartialFixedSampler(fixed_params, TrialSeededSampler(seed))


@dataclass
class Studies:
    """Both stages' studies of one sweep, each loaded once on the one `storage` of this process:
    stage 1, and stage 2 when there is one."""

    storage: optuna.storages.BaseStorage
    stage1: optuna.Study
    stage2: optuna.Study | None = None

    def latest(self, study: optuna.Study) -> list[FrozenTrial]:
        """`study`'s trials as the database holds them now (sweep.storage.latest_trials)."""
        return latest_trials(self.storage, study)

    def records(self) -> list[TrialRecord]:
        """Both stages' trials as the winner rule sees them (metrics at each trial's checkpointed epoch)."""
        stages = [(self.stage1, HEAD_STAGE), (self.stage2, FINETUNE_STAGE)]
        return [
            TrialRecord(
                number=t.number,
                state=t.state.name,
                params=dict(t.params),
                best_epoch=t.user_attrs.get("best_epoch"),
                train_acc=t.user_attrs.get("train_acc"),
                val_acc=t.user_attrs.get("val_acc"),
                run_id=t.user_attrs.get("mlflow_run_id"),
                model_id=t.user_attrs.get("mlflow_model_id"),  # none before checkpoints were logged models
                stage=stage,
            )
            for study, stage in stages
            if study is not None
            for t in self.latest(study)
        ]

    def rank(self, tolerance: float | None = None) -> Ranking:
        """Both stages' trials under the rule, with `tolerance` or else the one the study was run with."""
        attrs = self.stage1.user_attrs
        chosen = tolerance if tolerance is not None else attrs.get("tolerance", LEGACY_TOLERANCE)
        return rank(self.records(), chosen, dict(attrs))


def read_studies(stores: Stores) -> Studies:
    """A finished or running sweep's studies, for reading (`trials`, `best`): one storage, each study
    loaded once. Reading never creates a store: a SQLite file that is not there is an error."""
    name = stores.study
    if stores.storage_file is not None and not stores.storage_file.is_file():
        raise SweepError(
            f"no Optuna storage at {shown(stores.storage_file)}; run `python -m sweep run --study {name}` first, "
            "or pass the --storage of an existing sweep"
        )
    storage = make_storage(stores.storage)
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError as exc:
        raise SweepError(
            f"no study named {name!r} in {stores.shown_storage}; run `python -m sweep run --study {name}` first"
        ) from exc
    try:
        finetune = optuna.load_study(study_name=stores.finetune_study, storage=storage)
    except KeyError:
        finetune = None
    return Studies(storage, study, finetune)


def describe_trial(trial: FrozenTrial, stage: str, seconds: float) -> str:
    """One progress line per finished trial, with every parameter it trained with."""
    val, train = trial.user_attrs.get("val_acc"), trial.user_attrs.get("train_acc")
    scores = f"val_acc {val:.3f}  gap {train - val:+.3f}" if val is not None else "no epoch finished"
    line = f"{trial_name(stage, trial.number)}  {format_params(trial.params)}  {scores}  {trial.state.name:<8}"
    line += f"  {seconds:5.1f}s"
    epochs_run, epochs = len(trial.intermediate_values), trial.params.get("epochs")
    if trial.state == TrialState.COMPLETE and epochs is not None and epochs_run < epochs:
        line += f"  (stopped after epoch {epochs_run} of {epochs}: patience {trial.params.get('patience')})"
    if trial.state == TrialState.FAIL:
        line += f"  ({trial.user_attrs.get('error', 'failed')})"
    return line


class SurplusTrial(SweepError):
    """A trial created while the study's lock was lost, after others had already reached the target."""


@dataclass
class TrialLoop:
    """What `run_trials` runs: trials of `objective` (sweep.objective.TrackedObjective) in `study`
    until `target` finished ones that `counts`, under `lock`."""

    studies: Studies
    study: optuna.Study
    objective: Callable
    target: int
    lock: StudyLock
    counts: Callable[[FrozenTrial], bool] = lambda _: True

    def finished(self, trials: list[FrozenTrial]) -> int:
        return count_finished(trials, self.counts)

    def refuse_surplus(self, number: int) -> None:
        """The check-and-create made safe when its lock was lost on the way (a database restart drops
        the lock's connection, and with it the lock): the trial re-counts the others under the lock
        taken again, and steps aside, failed with the reason, if they already make the target. Two such
        trials re-count one after the other, so exactly one of them stays."""
        with holding(self.lock):
            others = [t for t in self.studies.latest(self.study) if t.number != number]
            taken = self.finished(others) + sum(t.state == TrialState.RUNNING for t in others)
        if taken >= self.target:
            raise SurplusTrial(
                f"not run: created while the study's lock was lost (database restart), and {taken} other trials "
                f"already finish or run toward the target of {self.target}"
            )

    def released_then_run(self, trial: optuna.Trial) -> float:
        """The objective, run once its trial exists: the study's lock released first (others may count
        the trial now), and the trial stepping aside if the lock was lost on the way."""
        try:
            guarded = self.lock.held()  # held from the count to here: the count was exact
            self.lock.release()  # the trial exists in the storage now: others may count it
            if not guarded:
                self.refuse_surplus(trial.number)
        except SurplusTrial as exc:
            trial.set_user_attr("error", str(exc))
            trial.set_user_attr("surplus", True)
            raise
        except Exception as exc:  # the lock's database gone past the budget: the trial still says why
            trial.set_user_attr("error", f"{type(exc).__name__}: {exc}")
            raise
        return self.objective(trial)


def run_trials(loop: TrialLoop, report: Report) -> tuple[int, list[str]]:
    """Run trials of `loop.objective` until `loop.study` has `loop.target` finished ones that count.

    With heartbeats, trials RUNNING elsewhere are waited for rather than counted as done: another
    worker's usually finish, and a crashed worker's go stale when their heartbeat stops and are then
    failed and replaced. Counting and creating a trial happen under the lock, so no worker on any
    machine overshoots the target; the lock is released as soon as the trial exists in the storage,
    where others count it. A failing trial is replaced, up to as many failures as trials were missing.
    Returns (trials finished by this process, error messages).
    """
    study, objective, lock = loop.study, loop.objective, loop.lock
    heartbeat = isinstance(loop.studies.storage, optuna.storages.RDBStorage)
    allowed_failures = max(loop.target - loop.finished(loop.studies.latest(study)), 1)
    done, errors = 0, []
    while len(errors) < allowed_failures:
        ran: list[FrozenTrial] = []
        lock.acquire()
        try:
            optuna.storages.fail_stale_trials(study)
            trials = loop.studies.latest(study)
            finished = loop.finished(trials)
            running = sum(t.state == TrialState.RUNNING for t in trials) if heartbeat else 0
            if finished >= loop.target:
                break
            if finished + running >= loop.target:
                lock.release()
                time.sleep(HEARTBEAT_SECONDS / 2)
                continue
            started, taken_over = time.perf_counter(), len(objective.taken_over)
            try:
                study.optimize(
                    loop.released_then_run,
                    n_trials=1,
                    catch=(Exception,),
                    callbacks=[lambda _, t, ran=ran: ran.append(t)],
                )
            except ValueError:  # "Cannot tell a FAIL trial": another worker failed it first
                if len(objective.taken_over) == taken_over:
                    raise
        finally:
            lock.release()
        if not ran:
            name = trial_name(objective.stage, objective.taken_over[-1])
            report(f"{name} failed: {TAKEN_OVER_REASON}")
            errors.append(f"{name}: {TAKEN_OVER_REASON}")
            continue
        trial = ran[0]
        report(describe_trial(trial, objective.stage, time.perf_counter() - started))
        if trial.state in FINISHED:
            done += 1
        elif not trial.user_attrs.get("surplus"):  # a surplus trial is no failure: others reached the target
            errors.append(f"{trial_name(objective.stage, trial.number)}: {trial.user_attrs.get('error', 'failed')}")
    return done, errors


def count_finished(trials: list[FrozenTrial], counts: Callable[[FrozenTrial], bool] = lambda _: True) -> int:
    """How many of `trials` finished (COMPLETE or PRUNED) and `counts`: what a target counts."""
    return sum(t.state in FINISHED and counts(t) for t in trials)
