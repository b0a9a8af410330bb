"""A pytest plugin that makes Optuna's own storage tests (tests/storages_tests of its source
distribution) run against our storage: every RDBStorage they build is sweep.storage's
OutageTolerantStorage. With SWEEP_OPTUNA_TESTS_POSTGRES set to a database URL, the SQLite files they
ask for become PostgreSQL instead, each in a fresh schema of that database (named in the URL, so a
second storage or another process on the same URL sees the same tables), and so does the TEST_DB_URL
that test_with_server.py runs on.

Loaded by tests/test_optuna_storage.py (`pytest -p optuna_storage_plugin`), never by our own suite.
"""

from __future__ import annotations

import itertools
import os

import optuna
import optuna.testing.storages
import sqlalchemy

from sweep.storage import OutageTolerantStorage

POSTGRES = os.environ.get("SWEEP_OPTUNA_TESTS_POSTGRES")
_schemas: dict[str, str] = {}
_numbers = itertools.count()


def on_postgres(sqlite_url: str) -> str:
    """The PostgreSQL URL that stands for `sqlite_url`: one fresh schema per SQLite file, and for
    each in-memory database (a new one every time)."""
    if sqlite_url not in _schemas or sqlite_url.endswith(":memory:"):
        schema = f"optuna_{os.getpid()}_{next(_numbers)}"
        engine = sqlalchemy.create_engine(POSTGRES)
        with engine.begin() as connection:
            connection.execute(sqlalchemy.text(f"CREATE SCHEMA {schema}"))
        engine.dispose()
        _schemas[sqlite_url] = f"{POSTGRES}?options=-csearch_path%3D{schema}"
    return _schemas[sqlite_url]


class OurStorage(OutageTolerantStorage):
    def __init__(self, url: str, engine_kwargs: dict | None = None, *args, **kwargs) -> None:
        if POSTGRES and url.startswith("sqlite"):
            url, engine_kwargs = on_postgres(url), None  # SQLite's connect_args mean nothing to psycopg
        super().__init__(url, engine_kwargs, *args, **kwargs)


def pytest_configure(config) -> None:
    # Before the test modules are imported: their `from optuna.storages import RDBStorage` gets ours,
    # and so does optuna.testing's StorageSupplier, which looks it up when it builds a storage. The
    # tests parametrized over every storage run on the two that are RDBStorage (plain and cached); on
    # PostgreSQL on the cached one only, which is what a study over our storage is (optuna.storages.
    # get_storage wraps an RDBStorage in _CachedStorage). The plain one's calls run in the SQLite
    # pass; on PostgreSQL they were a third of the pass's time.
    optuna.storages.RDBStorage = OurStorage
    optuna.testing.storages.STORAGE_MODES[:] = ["cached_sqlite"] if POSTGRES else ["sqlite", "cached_sqlite"]
    if POSTGRES:
        # test_with_server.py's tests share the database TEST_DB_URL names and expect to have it to
        # themselves, one test at a time: each xdist worker gets a schema of its own.
        os.environ["TEST_DB_URL"] = on_postgres("test_with_server")
