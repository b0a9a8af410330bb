"""Our Optuna storage: RDBStorage that rides out a lost database connection. The one module that reaches
into Optuna's internals; each reach-in is named here and pinned by tests/test_outages.py, which fails
when Optuna changes what it relies on:

- `OutageTolerantStorage` subclasses RDBStorage and retries the calls listed in DATABASE_CALLS (the
  test checks every public call of RDBStorage is listed or named as not reaching the database) and
  the private ones Optuna's per-process cache (`optuna.storages._CachedStorage`, which every study
  wraps around an RDBStorage) makes instead of public ones, CACHE_CALLS;
- it overrides `RDBStorage._create_new_trial` (the cache's way to create a trial) to mark the trials
  this tool creates, and `RDBStorage._get_stale_trial_ids` (what `optuna.storages.fail_stale_trials`
  calls), querying `optuna.storages._rdb.models` there.

Optuna's own storage tests run against this class (tests/test_optuna_storage.py). Everything else in
the project uses Optuna's public API.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages._rdb import models
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import orm

from sweep.stores import MAX_BACKOFF_SECONDS, lost_connection_to, mask_url, retrying, seconds_since_outage

# A trial whose process died stops sending heartbeats; after the grace period the next worker to
# look marks it FAIL (and the stale callback closes its MLflow run). Short enough that a resume right
# after a crash finds it soon, long enough that a busy worker never looks dead.
HEARTBEAT_SECONDS = int(os.environ.get("SWEEP_HEARTBEAT_SECONDS", "5"))
GRACE_SECONDS = 4 * HEARTBEAT_SECONDS
STALE_REASON = "no heartbeat within the grace period: its worker stopped, or could not reach the database"
TAKEN_OVER_REASON = (
    "failed as stale by another worker while it still ran: its heartbeat did not reach the database "
    "within the grace period (a database outage, or an overloaded machine)"
)
# The system attribute of every trial this tool creates: its worker sends heartbeats (study.optimize).
BEATS = "sweep:beats"

# RDBStorage's calls that reach the database, retried through an outage.
DATABASE_CALLS = (
    "create_new_study", "delete_study", "set_study_user_attr", "set_study_system_attr",
    "get_study_id_from_name", "get_study_name_from_id", "get_study_directions", "get_study_user_attrs",
    "get_study_system_attrs", "get_all_studies", "create_new_trial", "set_trial_param",
    "get_trial_id_from_study_id_trial_number", "get_trial_number_from_id", "get_trial_param",
    "set_trial_intermediate_value", "set_trial_user_attr", "set_trial_system_attr", "get_trial",
    "get_all_trials", "get_n_trials", "get_best_trial", "get_trial_params", "get_trial_user_attrs",
    "get_trial_system_attrs", "check_trial_is_updatable", "record_heartbeat",
)  # fmt: skip
# ... and those that do not (settings, the session's life, schema upgrades, run by hand).
LOCAL_CALLS = (
    "get_heartbeat_interval", "get_heartbeat_stale_trial_callback", "get_failed_trial_callback",
    "remove_session", "upgrade", "get_current_version", "get_head_version", "get_all_versions",
    "set_trial_state_values",  # retried by its own override below
)  # fmt: skip
# The private calls Optuna's cache makes in place of public ones (set_trial_param, get_all_trials,
# get_best_trial), retried the same way; _create_new_trial has its own override below.
CACHE_CALLS = ("_set_trial_param", "_get_trials", "_get_best_trial_id")


class OutageTolerantStorage(optuna.storages.RDBStorage):
    """RDBStorage whose database calls ride out a lost connection for `outage_seconds` (0 until the
    sweep has reached the database once: see `ride_out_outages`).

    A retried write may have been committed just before the connection broke. For most calls that is
    harmless (they set a value again); `set_trial_state_values` then finds the trial already in the
    state it asked for and counts that as done; `create_new_trial` may leave a second trial that no
    worker owns: it carries the BEATS mark like every trial the sweep creates (`marks_trials`), never
    gets a heartbeat, and so is failed as stale like a killed worker's."""

    outage_seconds: float = 0.0
    marks_trials: bool = False  # set by sweep.study.make_storage: the sweep's trials all send heartbeats

    def ride_out_outages(self, seconds: float) -> None:
        self.outage_seconds = seconds

    def _retried(self, name: str, *args: Any, **kwargs: Any) -> Any:
        call = getattr(super(), name)
        return self._riding_out(lambda: call(*args, **kwargs))

    def _riding_out(self, call: Callable[[], Any]) -> Any:
        """`call()`, repeated through a lost connection for up to `outage_seconds`."""
        what = f"the Optuna storage {mask_url(self.url)}"
        return retrying(call, what, self.outage_seconds, lost_connection_to(self.url))

    def _create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> FrozenTrial:
        if template_trial is None and self.marks_trials:
            # The mark goes in with the trial, in one transaction: a worker that dies right after
            # creating it (or a retried create's first, orphaned copy) leaves a marked trial.
            template_trial = optuna.trial.create_trial(state=TrialState.RUNNING, system_attrs={BEATS: True})
        return self._retried("_create_new_trial", study_id, template_trial)

    def set_trial_state_values(self, trial_id: int, state: TrialState, values=None) -> bool:
        attempts, rdb = [], super()

        def once() -> bool:
            attempts.append(1)
            try:
                return rdb.set_trial_state_values(trial_id, state, values)
            except UpdateFinishedTrialError:
                # On a retry, the first attempt may have been committed before its connection broke.
                if len(attempts) > 1 and rdb.get_trial(trial_id).state == state:
                    return True
                raise

        return self._riding_out(once)

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        """Optuna's stale trials (a heartbeat older than the grace period, by the database's clock),
        which also catches a worker that died between creating its trial and its first beat: a RUNNING
        trial with the BEATS mark and no heartbeat gets one here, from the first worker that sees it,
        so Optuna's rule fails it a grace period later unless its own worker beats by then. Trials
        without the mark (another client's `study.ask()`, which never beats) keep Optuna's contract:
        they stay RUNNING until their client finishes them.

        Right after this process saw the database down, none: every worker's heartbeats stopped with
        it, and a live worker's next beat may still be waiting out its retry's backoff. Trials are
        judged again once a grace period has passed since the beats could land."""
        grace = self.grace_period or 2 * (self.heartbeat_interval or 0)  # Optuna's default grace
        if seconds_since_outage(self.url) < MAX_BACKOFF_SECONDS + grace:
            return []

        def never_beaten() -> list[int]:
            with orm.sessionmaker(self.engine).begin() as db:
                query = (
                    db.query(models.TrialModel.trial_id)
                    .join(models.TrialSystemAttributeModel)
                    .filter(
                        models.TrialModel.study_id == study_id,
                        models.TrialModel.state == TrialState.RUNNING,
                        models.TrialSystemAttributeModel.key == BEATS,
                        ~models.TrialModel.heartbeats.any(),
                    )
                )
                return [trial_id for (trial_id,) in query.all()]

        for trial_id in self._riding_out(never_beaten):
            self.record_heartbeat(trial_id)
        return self._retried("_get_stale_trial_ids", study_id)


def _retry_method(name: str) -> Callable:
    def method(self: OutageTolerantStorage, *args: Any, **kwargs: Any) -> Any:
        return self._retried(name, *args, **kwargs)

    method.__name__ = name
    method.__doc__ = getattr(optuna.storages.RDBStorage, name).__doc__
    return method


for _name in DATABASE_CALLS + CACHE_CALLS:
    setattr(OutageTolerantStorage, _name, _retry_method(_name))


def latest_trials(storage: optuna.storages.BaseStorage, study: optuna.Study) -> list[FrozenTrial]:
    """Every trial of `study` as the database holds it now, read from `storage` (the one the study was
    opened on) past the per-process cache Optuna wraps around it: that cache can miss a trial another
    process created (seen here as a 7th trial of 6 when four processes on a busy 2-core machine shared
    a PostgreSQL study), so the count that guards the target reads past it."""
    study_id = storage.get_study_id_from_name(study.study_name)
    return storage.get_all_trials(study_id, deepcopy=False)
