"""The two stores behind a sweep (an Optuna storage, an MLflow tracking store): their URLs, what of
them may be shown, what a failure means, riding out an outage, and the study's lock.

- A URL may carry a password (`postgresql://user:SECRET@db/optuna`, `https://user:SECRET@mlflow`):
  every URL that leaves the process (a message, a param, a tag, a file) goes through `mask_url`.
- Once a sweep has reached its stores, a lost database connection or an unreachable tracking server
  is retried with backoff for up to `--outage-seconds` (`retrying`, `ride_out_tracking_outages`),
  and only then does the trial fail, naming the store. At start-up nothing is retried: a mistyped
  URL stays a one-line error in seconds.
- The study lock guards "count the finished trials, then create one", so that any number of
  workers on any number of machines finish a study with exactly its target. It lives where the
  study does: a PostgreSQL advisory lock (a MySQL named lock) on a connection of its own, or an
  exclusive lock on a file beside a SQLite database. It dies with its holder either way.
"""

from __future__ import annotations

import fcntl
import hashlib
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol, TypeVar

from optuna.exceptions import StorageInternalError
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import (
    ArgumentError,
    DBAPIError,
    InterfaceError,
    OperationalError,
    PendingRollbackError,
    SQLAlchemyError,
)
from sqlalchemy.pool import NullPool

RUNS_DIR = Path("mlruns")  # every piece of run state lives here by default: stores, artifacts, feature cache
STORAGE_ENV = "OPTUNA_STORAGE"  # the variable Optuna's own CLI reads for --storage
SQLITE = "sqlite:///"
CONNECT_TIMEOUT_SECONDS = 10  # a database server that does not answer fails in seconds, not minutes
DEFAULT_OUTAGE_SECONDS = 120
MAX_BACKOFF_SECONDS = 8.0
HTTP_BACKOFF_FACTOR = 2  # MLflow's default: waits of 2, 4, 8, ... s between attempts

_USERINFO_PASSWORD = re.compile(r"(?<=://)([^/@:]*):[^/@]*@")
_QUERY_PASSWORD = re.compile(r"(?i)(password=)[^&]*")

T = TypeVar("T")


class StorageError(RuntimeError):
    """The Optuna storage cannot be opened; the message names it (masked) and the likely fix."""


class StoreOutage(RuntimeError):
    """A store stayed unreachable for longer than the outage budget; the message names it."""


def sqlite_path(url: str) -> Path | None:
    """The database file of a `sqlite:///` URL, else None."""
    return Path(url.removeprefix(SQLITE)) if url.startswith(SQLITE) else None


def mask_url(url: str) -> str:
    """`url` with any password replaced by ***: the form to log, print or store."""
    try:
        masked = make_url(url).render_as_string(hide_password=True) if "://" in url else url
    except (ArgumentError, ValueError):  # not a database URL (an http URL with a port, say)
        masked = url
    masked = _USERINFO_PASSWORD.sub(r"\1:***@", masked)
    return _QUERY_PASSWORD.sub(r"\1***", masked)


def not_utf8(url: str) -> bool:
    """A URL built from a folder whose name is not valid UTF-8 (no database driver or HTTP client takes it)."""
    try:
        url.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


# The connection budget of one process on a database server: its storage's pool (the main thread and
# Optuna's heartbeat thread each hold one connection at a time; one more may open for a moment) plus
# the study lock's own connection while it counts and creates a trial. A PostgreSQL with its default
# max_connections = 100 (3 of them reserved) holds 97 // CONNECTIONS_PER_PROCESS processes, less what
# else connects (an MLflow server on the same database, psql).
POOL_SIZE, POOL_OVERFLOW = 2, 1
CONNECTIONS_PER_PROCESS = POOL_SIZE + POOL_OVERFLOW + 1


def engine_kwargs(url: str) -> dict | None:
    """SQLAlchemy engine options for an Optuna storage URL.

    SQLite: wait up to 60 s for another writer (workers queue rather than fail "database is locked").
    PostgreSQL and MySQL: give up connecting after CONNECT_TIMEOUT_SECONDS; test a pooled connection
    before using it (`pool_pre_ping`: after a database restart the dead ones are replaced, not used);
    and a pool of POOL_SIZE + POOL_OVERFLOW connections.
    """
    if url.startswith("sqlite"):
        return {"connect_args": {"timeout": 60}}
    if url.startswith(("postgresql", "mysql")):
        return {
            "connect_args": {"connect_timeout": CONNECT_TIMEOUT_SECONDS},
            "pool_pre_ping": True,
            "pool_size": POOL_SIZE,
            "max_overflow": POOL_OVERFLOW,
        }
    return None


def _hint(reason: str) -> str:
    lowered = reason.lower()
    if "password" in lowered or "authentication" in lowered or "access denied" in lowered:
        return (
            "check the user name and password; keep the password out of the URL with PGPASSWORD or a "
            "~/.pgpass line (PostgreSQL reads both itself)"
        )
    if "too many clients" in lowered or "connection slots" in lowered or "too many connections" in lowered:
        return (
            f"the database server has no connection left (max_connections); each process uses up to "
            f"{CONNECTIONS_PER_PROCESS}: run fewer processes or raise max_connections on the server"
        )
    if "does not exist" in lowered or "unknown database" in lowered:
        return "create the database first (e.g. `createdb -h HOST -p PORT -U USER NAME`) or fix its name in the URL"
    if "no module named" in lowered or "can't load plugin" in lowered:
        return "install the database driver: pip install -e '.[postgres]'"
    if any(word in lowered for word in ("refused", "timeout", "timed out", "translate host", "no route", "ssl")):
        return "check that the database server runs at that host and port"
    return f"check --storage (or ${STORAGE_ENV})"


def storage_error(url: str, exc: BaseException) -> StorageError:
    """One line that says which storage failed, why (in the driver's words), and what to do."""
    exc = driver_error(exc)
    cause = getattr(exc, "orig", None) or exc
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()] or [type(cause).__name__]
    reason = re.sub(r"\s+", " ", lines[0].removeprefix("connection failed: "))
    password = _password_of(url)
    if password:
        reason = reason.replace(password, "***")
    return StorageError(f"cannot open the Optuna storage {mask_url(url)}: {reason}; {_hint(reason)}")


def _password_of(url: str) -> str | None:
    try:
        return make_url(url).password
    except (ArgumentError, ValueError):
        return None


def driver_error(exc: BaseException) -> BaseException:
    """The error underneath Optuna's: RDBStorage wraps every SQLAlchemy error of a session (a refused
    connect included) in StorageInternalError, whose message blames invalid data. Its trial read
    answers an OperationalError by trying a slower query on the same session, which then fails with
    PendingRollbackError: the error it was handling (a lost connection, say) is the one that counts."""
    if isinstance(exc, StorageInternalError) and exc.__cause__ is not None:
        return driver_error(exc.__cause__)
    if isinstance(exc, PendingRollbackError) and exc.__context__ is not None:
        return driver_error(exc.__context__)
    return exc


def lost_connection(exc: BaseException) -> bool:
    """Whether a database error means "the server went away" (worth waiting for) rather than a
    mistake in the request (never worth repeating)."""
    exc = driver_error(exc)
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(exc, OperationalError | InterfaceError)


# When this process last saw each database (by URL) unreachable: a stale check right after an outage
# would take the trials of live workers whose heartbeats are still on their way back.
_last_seen_down: dict[str, float] = {}


def lost_connection_to(url: str) -> Callable[[BaseException], bool]:
    """lost_connection, noting the time when it is one (seconds_since_outage)."""

    def lost(exc: BaseException) -> bool:
        if lost_connection(exc):
            _last_seen_down[url] = time.monotonic()
            return True
        return False

    return lost


def seconds_since_outage(url: str) -> float:
    """Seconds since this process last saw the database at `url` unreachable (inf: never)."""
    return time.monotonic() - _last_seen_down.get(url, -math.inf)


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


def http_retries_for(budget: float, factor: int = HTTP_BACKOFF_FACTOR) -> int:
    """How many MLflow HTTP retries, waiting factor, 2*factor, 4*factor, ... s, cover `budget` seconds."""
    if budget <= 0:
        return 0
    return max(1, math.ceil(math.log2(budget / factor + 1)))


def ride_out_tracking_outages(budget: float) -> None:
    """Size MLflow's HTTP retries to the outage budget, unless the user set them: from now on a tracking
    call waits out an unreachable server (or a 5xx) for about `budget` seconds before it fails. The
    background thread that sends the epochs keeps them in order meanwhile (sweep.tracking)."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", str(HTTP_BACKOFF_FACTOR))
    factor = int(os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"])
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(http_retries_for(budget, factor)))


class StudyLock(Protocol):
    """acquire() blocks until this process holds the lock; release() is idempotent, so it can be
    handed to the objective (released once the trial exists) and still be called on every way out."""

    def acquire(self) -> None: ...

    def release(self) -> None: ...

    def held(self) -> bool: ...


def study_lock(storage: str, study_name: str, outage_seconds: float = 0) -> StudyLock:
    """The lock that guards `study_name`'s trial count in `storage`, for every worker that shares it;
    acquiring it waits out a database that is down for `outage_seconds`."""
    if storage.startswith("postgresql"):
        sql = ("SELECT pg_advisory_lock(:key)", "SELECT pg_advisory_unlock(:key)")
    elif storage.startswith("mysql"):
        sql = ("SELECT GET_LOCK(:key, -1)", "SELECT RELEASE_LOCK(:key)")
    else:
        database = sqlite_path(storage)
        return FileLock(Path(f"{database}.{study_name}.lock") if database else RUNS_DIR / f"{study_name}.lock")
    return DatabaseLock(storage, *sql, study_name, outage_seconds)


def lock_key(storage: str, study_name: str) -> int | str:
    """PostgreSQL's advisory locks take a 64-bit integer; MySQL's named locks a string of <= 64 chars."""
    digest = hashlib.blake2b(f"clothing-sweep:{study_name}".encode(), digest_size=8).digest()
    if storage.startswith("postgresql"):
        return int.from_bytes(digest, "big", signed=True)
    return f"clothing-sweep:{digest.hex()}"


class DatabaseLock:
    """A lock held by a connection of its own to the storage's database server.

    A database restart drops that connection, and the server forgets the lock with it: `held()` says
    whether this holder may still rely on it (sweep.study.run_trials re-checks its trial otherwise)."""

    def __init__(  # noqa: PLR0913 - the statements and key of one kind of database lock
        self, storage: str, lock_sql: str, unlock_sql: str, name: str, outage_seconds: float
    ) -> None:
        self._storage = storage
        # NullPool: closing the connection really disconnects, so nothing is left holding the lock.
        connect_args = (engine_kwargs(storage) or {}).get("connect_args", {})
        self._engine = create_engine(storage, poolclass=NullPool, connect_args=connect_args)
        self._lock, self._unlock = text(lock_sql), text(unlock_sql)
        self._name, self._key = name, {"key": lock_key(storage, name)}
        self._connection = None
        self.outage_seconds = outage_seconds

    def _lock_once(self) -> None:
        self.release()  # a connection left from a failed attempt
        self._connection = self._engine.connect()
        self._connection.execute(self._lock, self._key)

    def acquire(self) -> None:
        what = f"the Optuna storage {mask_url(self._storage)} (lock {self._name!r})"
        try:
            retrying(self._lock_once, what, self.outage_seconds, lost_connection_to(self._storage))
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


class FileLock:
    """An exclusive lock on a file; the OS releases it if the process dies. A file lock has no server
    to lose, so it has no outage to ride out."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._handle = None

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
