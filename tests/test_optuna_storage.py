"""Optuna's own storage tests, run against our storage (sweep.storage.OutageTolerantStorage) on SQLite
and on PostgreSQL: it must keep every promise Optuna's RDBStorage makes, heartbeats included.

The tests are Optuna's, not ours: `tests/storages_tests` of the installed Optuna's source
distribution, downloaded once (`pip download`) into a cache, and run in a pytest process of their own
with tests/optuna_storage_plugin.py, which makes every RDBStorage they build ours.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import optuna
import pytest

from bench.servers import postgres_cluster

pytestmark = pytest.mark.slow  # a pytest process of its own, with Optuna's heartbeat tests' sleeps

HERE = Path(__file__).resolve().parent
# What is left out of tests/storages_tests, and why: only these, so a new Optuna test runs by default.
EXCLUDED = {
    "journal_tests": "JournalStorage, not an RDBStorage",
    "test_grpc.py": "the gRPC proxy in front of a storage (needs grpcio), not an RDBStorage",
    "rdb_tests/test_storage.py::test_init_db_module_import_error": (
        "expects the psycopg2 driver's ImportError; fails the same with Optuna's own RDBStorage"
    ),
}
ON_SQLITE_ONLY = {
    **{
        f"rdb_tests/test_storage.py::test_upgrade_{what}": "upgrades SQLite files of older Optuna versions"
        for what in ("single_objective_optimization", "multi_objective_optimization", "distributions")
    },
    "rdb_tests/test_storage.py::test_init_url_template": "checks the SQLite file's name in the engine's URL",
}
SQLITE_MINIMUM, POSTGRES_MINIMUM = 200, 140  # of 218 and 148 with Optuna 5.1.0: fewer, some went uncollected


@pytest.fixture(scope="session")
def optuna_storage_tests() -> Path:
    """tests/storages_tests of the installed Optuna's source distribution, cached across runs."""
    version = optuna.__version__
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "clothing-sweep" / f"optuna-{version}"
    if not (cache / "tests" / "storages_tests").is_dir():
        with tempfile.TemporaryDirectory() as download:
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:"]
                + [f"optuna=={version}", "--dest", download],
                check=True,
            )
            (archive,) = Path(download).glob("optuna-*.tar.gz")
            unpacked = Path(tempfile.mkdtemp(dir=cache.parent if cache.parent.exists() else None))
            with tarfile.open(archive) as sdist:
                prefix = f"optuna-{version}/tests/"
                members = [m for m in sdist.getmembers() if m.name.startswith(prefix)]
                sdist.extractall(unpacked, members=members, filter="data")
            cache.parent.mkdir(parents=True, exist_ok=True)
            try:
                (unpacked / f"optuna-{version}").rename(cache)
            except OSError:  # another pytest worker cached it first
                shutil.rmtree(unpacked)
    (cache / "pytest.ini").write_text(
        "[pytest]\nfilterwarnings = ignore::optuna.exceptions.ExperimentalWarning\nmarkers = slow\n"
    )
    return cache


def start_optuna_tests(root: Path, excluded: dict[str, str], env: dict[str, str]) -> subprocess.Popen:
    """Optuna's storage tests in a process of their own, in 4 xdist workers (they mostly wait out
    heartbeat grace periods, so more workers than cores pays)."""
    suite = "tests/storages_tests"
    leave_out = []
    for name in excluded:
        leave_out += ["--deselect" if "::" in name else "--ignore", f"{suite}/{name}"]
    return subprocess.Popen(
        [sys.executable, "-m", "pytest", suite, "-c", "pytest.ini", "--rootdir", "."]
        + ["-p", "optuna_storage_plugin", "-p", "no:cacheprovider", "-n", "4", "-q", *leave_out],
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent)]), **env},
        cwd=root,  # node ids relative to it, as --deselect spells them
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def count_passed(run: subprocess.Popen, backend: str) -> int:
    """How many tests passed in `run`, which must end well."""
    output = run.communicate(timeout=900)[0]
    assert run.returncode == 0, f"Optuna's storage tests on {backend}:\n{output[-6000:]}"
    passed = re.search(r"(\d+) passed", output)
    return int(passed.group(1)) if passed else 0


def test_optunas_storage_tests_pass_on_our_storage_on_sqlite_and_on_postgresql(optuna_storage_tests):
    """Both passes at once: each spends most of its time asleep in Optuna's heartbeat tests."""
    password = "optuna-Tests-1"
    with postgres_cluster(password) as pg, contextlib.ExitStack() as runs:
        url = pg.url(pg.create_database("optuna"), password=password)
        # Each pass is killed, then waited for, on the way out: a failure (or a failed start of the
        # other) ends both; killing one that has finished does nothing.
        on_sqlite = runs.enter_context(start_optuna_tests(optuna_storage_tests, EXCLUDED, {}))
        runs.callback(on_sqlite.kill)
        on_postgresql = runs.enter_context(
            start_optuna_tests(optuna_storage_tests, EXCLUDED | ON_SQLITE_ONLY, {"SWEEP_OPTUNA_TESTS_POSTGRES": url})
        )
        runs.callback(on_postgresql.kill)
        assert count_passed(on_sqlite, "SQLite") >= SQLITE_MINIMUM
        assert count_passed(on_postgresql, "PostgreSQL") >= POSTGRES_MINIMUM
