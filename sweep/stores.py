"""The two stores' URLs: what of them is safe to show, how to connect, and what a failure means.

A URL may carry a password (`postgresql://user:SECRET@db/optuna`, `https://user:SECRET@mlflow`).
Every URL that leaves the process (a message, a param, a tag, a file) goes through `mask_url` first.
"""

from __future__ import annotations

import re

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

STORAGE_ENV = "OPTUNA_STORAGE"  # the variable Optuna's own CLI reads for --storage
CONNECT_TIMEOUT_SECONDS = 10  # a database server that does not answer fails in seconds, not minutes

_USERINFO_PASSWORD = re.compile(r"(?<=://)([^/@:]*):[^/@]*@")
_QUERY_PASSWORD = re.compile(r"(?i)(password=)[^&]*")


class StorageError(RuntimeError):
    """The Optuna storage cannot be opened; the message names it (masked) and the likely fix."""


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
