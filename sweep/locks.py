"""The guard around "count the finished trials, then create one", so that any number of workers on
any number of machines finish a study with exactly its target.

The lock lives where the study does:
- PostgreSQL: a session-level advisory lock keyed by the study name, held on its own connection;
- MySQL: a named lock (GET_LOCK), the same idea (not exercised by the tests: no MySQL here);
- SQLite and other file stores: an exclusive lock on a file beside the database; only processes on
  one machine can share such a store anyway.
In each case the lock dies with its holder (a dropped connection, a closed file), so a killed worker
never leaves the study locked.
"""

from __future__ import annotations

import fcntl
import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

from sqlalchemy import create_engine, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import NullPool

from sweep.config import RUNS_DIR
from sweep.outages import lost_connection, retrying
from sweep.stores import engine_kwargs, mask_url, storage_error


class StudyLock(Protocol):
    """acquire() blocks until this process holds the lock; release() is idempotent, so it can be
    handed to the objective (released once the trial exists) and still be called on every way out."""

    def acquire(self) -> None: ...

    def release(self) -> None: ...

    def held(self) -> bool: ...

    def ride_out_outages(self, seconds: float) -> None: ...


def study_lock(storage: str, study_name: str) -> StudyLock:
    """The lock that guards `study_name`'s trial count in `storage`, for every worker that shares it."""
    if storage.startswith("postgresql"):
        return DatabaseLock(storage, "SELECT pg_advisory_lock(:key)", "SELECT pg_advisory_unlock(:key)", study_name)
    if storage.startswith("mysql"):
        return DatabaseLock(storage, "SELECT GET_LOCK(:key, -1)", "SELECT RELEASE_LOCK(:key)", study_name)
    return FileLock(lock_path(storage, study_name))


def lock_key(storage: str, study_name: str) -> int | str:
    """PostgreSQL's advisory locks take a 64-bit integer; MySQL's named locks a string of <= 64 chars."""
    digest = hashlib.blake2b(f"clothing-sweep:{study_name}".encode(), digest_size=8).digest()
    if storage.startswith("postgresql"):
        return int.from_bytes(digest, "big", signed=True)
    return f"clothing-sweep:{digest.hex()}"


class DatabaseLock:
    """A lock held by a connection of its own to the storage's database server.

    A database restart drops that connection, and the server forgets the lock with it: `held()` says
    whether this holder may still rely on it (sweep.study.run_trials re-checks its trial otherwise).
    Once `ride_out_outages` has given it a budget, acquiring waits out a database that is down."""

    def __init__(self, storage: str, lock_sql: str, unlock_sql: str, study_name: str) -> None:
        self._storage = storage
        # NullPool: closing the connection really disconnects, so nothing is left holding the lock.
        connect_args = (engine_kwargs(storage) or {}).get("connect_args", {})
        self._engine = create_engine(storage, poolclass=NullPool, connect_args=connect_args)
        self._lock, self._unlock = text(lock_sql), text(unlock_sql)
        self._key = {"key": lock_key(storage, study_name)}
        self._connection = None
        self.outage_seconds = 0.0

    def ride_out_outages(self, seconds: float) -> None:
        self.outage_seconds = seconds

    def _lock_once(self) -> None:
        self.release()  # a connection left from a failed attempt
        self._connection = self._engine.connect()
        self._connection.execute(self._lock, self._key)

    def acquire(self) -> None:
        what = f"the Optuna storage {mask_url(self._storage)} (study lock)"
        try:
            retrying(self._lock_once, what, self.outage_seconds, lost_connection)
        except SQLAlchemyError as exc:
            self.release()
            raise storage_error(self._storage, exc) from exc

    def held(self) -> bool:
        """Whether the lock's connection is still alive, and so the lock still ours."""
        if self._connection is None:
            return False
        try:
            self._connection.execute(text("SELECT 1"))
            return True
        except SQLAlchemyError:
            return False

    def release(self) -> None:
        connection, self._connection = self._connection, None
        if connection is None:
            return
        try:
            connection.execute(self._unlock, self._key)
        except SQLAlchemyError:
            pass  # the connection is gone, and the server released the lock with it
        finally:
            connection.close()


def lock_path(storage: str, study_name: str) -> Path:
    """A lock file beside a SQLite database; in mlruns/ for another file store."""
    if storage.startswith("sqlite:///"):
        return Path(f"{storage.removeprefix('sqlite:///')}.{study_name}.lock")
    return RUNS_DIR / f"{study_name}.lock"


class FileLock:
    """An exclusive lock on a file; the OS releases it if the process dies."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._handle = None

    def ride_out_outages(self, seconds: float) -> None:
        """A file lock has no server to lose."""

    def held(self) -> bool:
        return self._handle is not None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = open(self.path, "a")  # noqa: SIM115 - held across calls by design
        fcntl.flock(self._handle, fcntl.LOCK_EX)

    def release(self) -> None:
        if self._handle is not None:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None


@contextmanager
def holding(lock: StudyLock) -> Iterator[None]:
    lock.acquire()
    try:
        yield
    finally:
        lock.release()
