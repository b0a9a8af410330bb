"""Riding out a store that goes away for a while, once a sweep has reached it.

A database restart (a failover, a maintenance window) drops every connection; a redeployed MLflow
server refuses connections for half a minute. A worker that has already reached its stores then
retries, with backoff, for up to `--outage-seconds` (one setting, default 120 s), and only then lets
the trial fail with a reason that names the store. At start-up nothing is retried: a mistyped URL
stays a one-line error in seconds.

- The Optuna storage: `OutageTolerantStorage`, Optuna's RDBStorage with every call that reaches the
  database retried on a lost connection (SQLAlchemy's `pool_pre_ping` replaces the dead pooled
  connections), and heartbeat-less RUNNING trials treated as stale (see `_get_stale_trial_ids`).
- The tracking server: MLflow's own HTTP retries (MLFLOW_HTTP_REQUEST_MAX_RETRIES, _BACKOFF_FACTOR),
  sized by `http_retries_for` to cover the same budget; the background thread that sends the epochs
  keeps them in order meanwhile (sweep.tracking).
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, TypeVar

import optuna
from optuna.exceptions import StorageInternalError, UpdateFinishedTrialError
from optuna.storages._rdb import models
from optuna.trial import TrialState
from sqlalchemy import orm
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from sweep.stores import mask_url

DEFAULT_OUTAGE_SECONDS = 120
MAX_BACKOFF_SECONDS = 8.0
HTTP_BACKOFF_FACTOR = 2  # MLflow's default: waits of 2, 4, 8, ... s between attempts
STALE_REASON = "no heartbeat within the grace period: its worker stopped, or could not reach the database"
TAKEN_OVER_REASON = (
    "failed as stale by another worker while it still ran: its heartbeat did not reach the database "
    "within the grace period (a database outage, or an overloaded machine)"
)

T = TypeVar("T")


class StoreOutage(RuntimeError):
    """A store stayed unreachable for longer than the outage budget; the message names it."""


class TrialTakenOver(RuntimeError):
    """This process's trial was failed as stale by another worker; it was stopped and its run closed."""


def driver_error(exc: BaseException) -> BaseException:
    """The error underneath Optuna's: RDBStorage wraps every SQLAlchemy error of a session (a refused
    connect included) in StorageInternalError, whose message blames invalid data."""
    if isinstance(exc, StorageInternalError) and exc.__cause__ is not None:
        return exc.__cause__
    return exc


def lost_connection(exc: BaseException) -> bool:
    """Whether a database error means "the server went away" (worth waiting for) rather than a
    mistake in the request (never worth repeating)."""
    exc = driver_error(exc)
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(exc, OperationalError | InterfaceError)


def outage_reason(exc: BaseException) -> str:
    """The driver's own first line ("connection refused", "the database system is shutting down")."""
    exc = driver_error(exc)
    return str(getattr(exc, "orig", None) or exc).strip().splitlines()[0][:200]


def retrying(call: Callable[[], T], what: str, budget: float, is_transient: Callable[[BaseException], bool]) -> T:
    """`call()`, repeated with backoff while it fails transiently, for up to `budget` seconds; one
    line on stderr when an outage starts and one when it ends. StoreOutage after the budget."""
    deadline, wait, started = time.monotonic() + budget, 0.5, None
    while True:
        try:
            result = call()
        except Exception as exc:
            if budget <= 0 or not is_transient(exc):
                raise
            if started is None:
                started = time.monotonic()
                reason = outage_reason(exc)
                print(f"{what} unreachable ({reason}); retrying for up to {budget:.0f} s", file=sys.stderr)
            if time.monotonic() + wait > deadline:
                raise StoreOutage(f"{what} stayed unreachable for {budget:.0f} s (--outage-seconds)") from exc
            time.sleep(wait)
            wait = min(2 * wait, MAX_BACKOFF_SECONDS)
            continue
        if started is not None:
            print(f"{what} reachable again after {time.monotonic() - started:.0f} s", file=sys.stderr)
        return result


# RDBStorage's calls that reach the database (the rest read settings or manage the session).
DATABASE_CALLS = (
    "create_new_study", "delete_study", "set_study_user_attr", "set_study_system_attr",
    "get_study_id_from_name", "get_study_name_from_id", "get_study_directions", "get_study_user_attrs",
    "get_study_system_attrs", "get_all_studies", "create_new_trial", "set_trial_param",
    "get_trial_id_from_study_id_trial_number", "get_trial_number_from_id", "get_trial_param",
    "set_trial_intermediate_value", "set_trial_user_attr", "set_trial_system_attr", "get_trial",
    "get_all_trials", "get_n_trials", "get_best_trial", "get_trial_params", "get_trial_user_attrs",
    "get_trial_system_attrs", "check_trial_is_updatable", "record_heartbeat",
)  # fmt: skip


class OutageTolerantStorage(optuna.storages.RDBStorage):
    """RDBStorage whose database calls ride out a lost connection for `outage_seconds` (0 until the
    sweep has reached the database once: see `ride_out_outages`).

    A retried write may have been committed just before the connection broke. For most calls that is
    harmless (they set a value again); `set_trial_state_values` then finds the trial already in the
    state it asked for and counts that as done; `create_new_trial` may leave a second trial that no
    worker owns, which never gets a heartbeat and so is failed as stale like a killed worker's."""

    outage_seconds: float = 0.0

    def ride_out_outages(self, seconds: float) -> None:
        self.outage_seconds = seconds

    def _retried(self, name: str, *args: Any, **kwargs: Any) -> Any:
        call = getattr(super(), name)
        return retrying(lambda: call(*args, **kwargs), self._what(), self.outage_seconds, lost_connection)

    def _what(self) -> str:
        return f"the Optuna storage {mask_url(self.url)}"

    def set_trial_state_values(self, trial_id: int, state: TrialState, values=None) -> bool:
        attempts = []

        def once() -> bool:
            attempts.append(1)
            try:
                return optuna.storages.RDBStorage.set_trial_state_values(self, trial_id, state, values)
            except UpdateFinishedTrialError:
                # On a retry, the first attempt may have been committed before its connection broke.
                if len(attempts) > 1 and optuna.storages.RDBStorage.get_trial(self, trial_id).state == state:
                    return True
                raise

        return retrying(once, self._what(), self.outage_seconds, lost_connection)

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        """Optuna's stale trials (a heartbeat older than the grace period), and also RUNNING trials
        that never got a heartbeat and started longer ago than that: their worker died between
        creating the trial and its first beat (or a retried create made a second one). Optuna skips
        those, and they would stay RUNNING, counted as in progress, forever."""

        def stale() -> list[int]:
            found = set(optuna.storages.RDBStorage._get_stale_trial_ids(self, study_id))
            grace = timedelta(seconds=self.grace_period or 2 * (self.heartbeat_interval or 0))
            now = datetime.now()  # datetime_start is this clock's (Optuna's client-side now()), not the server's
            with orm.Session(self.engine) as session:
                running = (
                    session.query(models.TrialModel)
                    .options(orm.selectinload(models.TrialModel.heartbeats))
                    .filter(models.TrialModel.study_id == study_id, models.TrialModel.state == TrialState.RUNNING)
                    .all()
                )
                for trial in running:
                    started = trial.datetime_start
                    if not trial.heartbeats and started is not None and now - started > grace:
                        found.add(trial.trial_id)
            return sorted(found)

        stale_ids = retrying(stale, self._what(), self.outage_seconds, lost_connection)
        for trial_id in stale_ids:  # the reason, while the trial can still take it (Optuna records none)
            try:
                self.set_trial_user_attr(trial_id, "error", STALE_REASON)
            except UpdateFinishedTrialError:
                pass  # another worker failed it first
        return stale_ids


def _retry_method(name: str) -> Callable:
    def method(self: OutageTolerantStorage, *args: Any, **kwargs: Any) -> Any:
        return self._retried(name, *args, **kwargs)

    method.__name__ = name
    method.__doc__ = getattr(optuna.storages.RDBStorage, name).__doc__
    return method


for _name in DATABASE_CALLS:
    setattr(OutageTolerantStorage, _name, _retry_method(_name))


def http_retries_for(budget: float, factor: int = HTTP_BACKOFF_FACTOR) -> int:
    """How many MLflow HTTP retries, waiting factor, 2*factor, 4*factor, ... s, cover `budget` seconds."""
    if budget <= 0:
        return 0
    return max(1, math.ceil(math.log2(budget / factor + 1)))


def ride_out_tracking_outages(budget: float) -> None:
    """Size MLflow's HTTP retries to the outage budget, unless the user set them: from now on a tracking
    call waits out an unreachable server (or a 5xx) for about `budget` seconds before it fails."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", str(HTTP_BACKOFF_FACTOR))
    factor = int(os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"])
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(http_retries_for(budget, factor)))
