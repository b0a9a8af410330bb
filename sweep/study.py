"""The Optuna side of a sweep: storage, samplers, the two studies, and the trial loop.

Storage mechanics: every RDB storage (SQLite by default, PostgreSQL for several machines) has
heartbeats, so a crashed trial goes stale and is failed and replaced; every worker, on any machine,
counts and creates trials under the study's lock (`sweep.locks`), so the target is met exactly.

Stage 2 lives in a study of its own, `<study>.finetune`, in the same storage: the stage-1 sampler
never sees a stage-2 observation, and each study's trial numbers name its trials (trial-007,
finetune-000).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import optuna
import torch
from optuna.samplers import BaseSampler, PartialFixedSampler, TPESampler
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.exc import SQLAlchemyError

from clothing.data import shown
from sweep.config import SweepConfig
from sweep.locks import StudyLock, holding, study_lock
from sweep.outages import TAKEN_OVER_REASON, OutageTolerantStorage
from sweep.select import DEFAULT_TOLERANCE, FINETUNE_STAGE, HEAD_STAGE, TrialRecord, rule_text, trial_name
from sweep.space import describe_finetune_space, describe_space, space_signature
from sweep.stores import StorageError, engine_kwargs, mask_url, not_utf8, storage_error
from sweep.table import format_params

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


def finetune_study_name(study: str) -> str:
    return f"{study}.{FINETUNE_STAGE}"


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


StaleTrialCallback = Callable[[optuna.Study, FrozenTrial], None]


def make_storage(url: str, on_stale_trial: StaleTrialCallback | None = None) -> optuna.storages.BaseStorage:
    """An Optuna storage with heartbeats, so that a crashed trial does not stay RUNNING forever
    (`on_stale_trial` runs for each one failed that way). Built once per process: every study of a
    sweep is opened on it. A storage that cannot be opened raises StorageError, which names it
    (password masked) and the fix."""
    if not_utf8(url):
        raise StorageError(f"the Optuna storage {shown(url)} is not valid UTF-8; put it in a folder whose name is")
    if url.startswith("sqlite:///"):
        os.makedirs(os.path.dirname(url.removeprefix("sqlite:///")) or ".", exist_ok=True)
    try:
        if not url.startswith(RDB_SCHEMES):
            return optuna.storages.get_storage(url)
        # Optuna creates its tables on first use; machines that start together on an empty database
        # would race to create them, so they take turns (a lock that needs no table).
        with holding(study_lock(url, "optuna-schema")):
            return OutageTolerantStorage(
                url,
                engine_kwargs=engine_kwargs(url),
                heartbeat_interval=HEARTBEAT_SECONDS,
                grace_period=GRACE_SECONDS,
                heartbeat_stale_trial_callback=on_stale_trial,
            )
    except (SQLAlchemyError, ImportError, ValueError) as exc:
        raise storage_error(url, exc) from exc


def open_study(
    storage: optuna.storages.BaseStorage, name: str, cfg: SweepConfig, *, startup_trials: int = 5, create: bool = True
) -> optuna.Study | None:
    """The study `name` on `storage`, set up for running trials: created when `create` (resumed when it
    exists), else loaded, or None when there is none. The median pruner starts pruning once
    `startup_trials` trials have finished."""
    sampler = TrialSeededSampler(cfg.seed)
    pruner = (
        optuna.pruners.MedianPruner(n_startup_trials=startup_trials, n_warmup_steps=2)
        if cfg.pruner == "median"
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


def pin_params(study: optuna.Study, fixed_params: dict) -> None:
    """From now on, the study's trials take `fixed_params` as they are (stage 2's recipe), in place of
    any recipe pinned before (stage 2 from another source)."""
    sampler = study.sampler
    if isinstance(sampler, PartialFixedSampler):
        sampler = sampler._base_sampler  # noqa: SLF001 - the sampler it wraps, to wrap it only once
    study.sampler = PartialFixedSampler(fixed_params, sampler)


@dataclass
class Studies:
    """Both stages' studies of one sweep, each loaded once: stage 1, and stage 2 when there is one."""

    stage1: optuna.Study
    stage2: optuna.Study | None = None

    def records(self) -> list[TrialRecord]:
        """Both stages' trials as the winner rule sees them, as the database holds them now."""
        return trial_records(self.stage1, self.stage2)


def read_studies(url: str, name: str) -> Studies:
    """A finished or running sweep's studies, for reading (`trials`, `best`): one storage, each study
    loaded once. Reading never creates a store: a SQLite file that is not there is an error."""
    database = url.removeprefix("sqlite:///") if url.startswith("sqlite:///") else None
    if database is not None and not os.path.isfile(database):
        raise SweepError(
            f"no Optuna storage at {shown(database)}; run `python -m sweep run --study {name}` first, "
            "or pass the --storage of an existing sweep"
        )
    store = make_storage(url)
    try:
        study = optuna.load_study(study_name=name, storage=store)
    except KeyError as exc:
        raise SweepError(
            f"no study named {name!r} in {mask_url(url)}; run `python -m sweep run --study {name}` first"
        ) from exc
    try:
        finetune = optuna.load_study(study_name=finetune_study_name(name), storage=store)
    except KeyError:
        finetune = None
    return Studies(study, finetune)


def study_tolerance(study: optuna.Study, tolerance: float | None = None) -> float:
    """`tolerance` if given, else the one the study was run with (0.02 for studies older than that)."""
    return tolerance if tolerance is not None else study.user_attrs.get("tolerance", DEFAULT_TOLERANCE)


def refuse_changed_space(cfg: SweepConfig, study: optuna.Study | None) -> None:
    """A study resumes only with the space it sampled from: stop before any work if it differs."""
    if study is None:
        return  # a new study
    recorded, wanted = study.user_attrs.get("space"), space_signature(cfg)
    if recorded is not None and recorded != wanted:
        changed = sorted(k for k in recorded.keys() | wanted.keys() if recorded.get(k) != wanted.get(k))
        raise SweepError(
            f"study {cfg.study!r} was run with another search space, held-out split or image size "
            f"({', '.join(changed)} differ: "
            f"recorded {json.dumps({k: recorded.get(k) for k in changed})}); resume it with the same space, "
            "or pass --study NEW_NAME to start a new study with this one"
        )


def describe_study(study: optuna.Study, cfg: SweepConfig, stage: str) -> None:
    """User attrs that say what the study is, in optuna-dashboard and anywhere else it is read."""
    study.set_user_attr("rule", rule_text(cfg.tolerance))
    study.set_user_attr("tolerance", cfg.tolerance)
    study.set_user_attr("objective", "maximize val_acc at the trial's best epoch (reported every epoch)")
    stages = {HEAD_STAGE: f"stage 1: a head on frozen features ({cfg.study})"}
    if cfg.finetune_blocks:
        blocks = f"1-{cfg.finetune_blocks}" if cfg.finetune_trials > 1 else cfg.finetune_blocks
        stages[FINETUNE_STAGE] = (
            f"stage 2: the stage-1 winner's last {blocks} block(s) fine-tuned, {cfg.finetune_trials} trial(s) "
            f"({finetune_study_name(cfg.study)})"
        )
    study.set_user_attr("stages", stages)
    study.set_user_attr("stage", stage)
    space = describe_space(cfg) if stage == HEAD_STAGE else describe_finetune_space(cfg)
    study.set_user_attr("search_space", space)
    if stage == HEAD_STAGE:
        study.set_user_attr("space", space_signature(cfg))  # what refuse_changed_space compares


def trial_records(study: optuna.Study, finetune: optuna.Study | None = None) -> list[TrialRecord]:
    """Both stages' trials as the winner rule sees them (metrics at each trial's checkpointed epoch)."""
    studies = [(study, HEAD_STAGE)] + ([(finetune, FINETUNE_STAGE)] if finetune is not None else [])
    return [
        TrialRecord(
            number=t.number,
            state=t.state.name,
            params=dict(t.params),
            best_epoch=t.user_attrs.get("best_epoch"),
            train_acc=t.user_attrs.get("train_acc"),
            val_acc=t.user_attrs.get("val_acc"),
            run_id=t.user_attrs.get("mlflow_run_id"),
            stage=stage,
        )
        for s, stage in studies
        for t in latest_trials(s)
    ]


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


def latest_trials(study: optuna.Study) -> list[FrozenTrial]:
    """Every trial as the database holds it now. Optuna's per-process cache of an RDB storage can miss
    a trial another process created (seen here as a 7th trial of 6 when four processes on a busy
    2-core machine shared a PostgreSQL study), so the count that guards the target reads past it."""
    storage = study._storage  # noqa: SLF001 - the cache Optuna wraps around the storage we gave it
    backend = getattr(storage, "_backend", storage)
    return backend.get_all_trials(study._study_id, deepcopy=False)  # noqa: SLF001


def count_finished(study: optuna.Study, counts: Callable[[FrozenTrial], bool] = lambda _: True) -> int:
    """Finished trials that `counts`, read past Optuna's cache like the guard's own count."""
    return sum(t.state in FINISHED and counts(t) for t in latest_trials(study))


def has_heartbeat(study: optuna.Study) -> bool:
    """Whether the study's storage sends heartbeats (every RDB storage here: sweep.study.make_storage)."""
    backend = getattr(study._storage, "_backend", study._storage)  # noqa: SLF001 - see latest_trials
    return getattr(backend, "get_heartbeat_interval", lambda: None)() is not None


class SurplusTrial(SweepError):
    """A trial created while the study's lock was lost, after others had already reached the target."""


def refuse_surplus(study: optuna.Study, number: int, target: int, lock: StudyLock, counts) -> None:
    """The check-and-create made safe when its lock was lost on the way (a database restart drops the
    lock's connection, and with it the lock): the trial re-counts the others under the lock taken
    again, and steps aside, failed with the reason, if they already make the target. Two such trials
    re-count one after the other, so exactly one of them stays."""
    with holding(lock):
        others = [t for t in latest_trials(study) if t.number != number]
        taken = sum((t.state in FINISHED and counts(t)) or t.state == TrialState.RUNNING for t in others)
    if taken >= target:
        raise SurplusTrial(
            f"not run: created while the study's lock was lost (database restart), and {taken} other trials "
            f"already finish or run toward the target of {target}"
        )


def release_then(
    objective, study: optuna.Study, target: int, lock: StudyLock, counts
) -> Callable[[optuna.Trial], float]:
    """`objective`, run once its trial exists: the study's lock released first (others may count the
    trial now), and the trial stepping aside if the lock was lost on the way (`refuse_surplus`)."""

    def run(trial: optuna.Trial) -> float:
        try:
            guarded = lock.held()  # held from the count to here: the count was exact
            lock.release()  # the trial exists in the storage now: others may count it
            if not guarded:
                refuse_surplus(study, trial.number, target, lock, counts)
        except SurplusTrial as exc:
            trial.set_user_attr("error", str(exc))
            trial.set_user_attr("surplus", True)
            raise
        except Exception as exc:  # the lock's database gone past the budget: the trial still says why
            trial.set_user_attr("error", f"{type(exc).__name__}: {exc}")
            raise
        return objective(trial)

    return run


def run_trials(
    study: optuna.Study,
    objective,
    target: int,
    lock: StudyLock,
    report: Report,
    counts: Callable[[FrozenTrial], bool] = lambda _: True,
) -> tuple[int, list[str]]:
    """Run trials of `objective` (a TrackedObjective) until `study` has `target` finished ones that
    `counts`.

    With heartbeats, trials RUNNING elsewhere are waited for rather than counted as done: another
    worker's usually finish, and a crashed worker's go stale when their heartbeat stops and are then
    failed and replaced. Counting and creating a trial happen under `lock`, so no worker on any
    machine overshoots the target; the lock is released here as soon as the trial exists in the
    storage, where others count it. A failing trial is replaced, up to as many failures as trials
    were missing. Returns (trials finished by this process, error messages).
    """
    heartbeat = has_heartbeat(study)
    allowed_failures = max(target - count_finished(study, counts), 1)
    done, errors = 0, []
    released_then_run = release_then(objective, study, target, lock, counts)

    while len(errors) < allowed_failures:
        ran: list[FrozenTrial] = []
        lock.acquire()
        try:
            optuna.storages.fail_stale_trials(study)
            trials = latest_trials(study)
            finished = sum(t.state in FINISHED and counts(t) for t in trials)
            running = sum(t.state == TrialState.RUNNING for t in trials) if heartbeat else 0
            if finished >= target:
                break
            if finished + running >= target:
                lock.release()
                time.sleep(HEARTBEAT_SECONDS / 2)
                continue
            started, taken_over = time.perf_counter(), len(objective.taken_over)
            try:
                study.optimize(
                    released_then_run, n_trials=1, catch=(Exception,), callbacks=[lambda _, t, ran=ran: ran.append(t)]
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
