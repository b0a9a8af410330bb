"""Several workers on one study: an exclusive lock so the trial target is met exactly, and the
worker processes behind `--jobs N`."""

from __future__ import annotations

import fcntl
import multiprocessing
import os
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from pathlib import Path

from sweep.config import RUNS_DIR


def lock_path(storage: str) -> Path:
    """A lock file beside a SQLite or journal store; in mlruns/ for a server storage.

    The lock serialises "count the trials, then create one" among the workers of one machine. Workers
    on several machines (a PostgreSQL/MySQL storage) do not share it; there the target can be
    overshot by a trial when two machines start their last trial in the same instant.
    """
    if storage.startswith("sqlite:///"):
        return Path(storage.removeprefix("sqlite:///") + ".lock")
    return RUNS_DIR / "study.lock"


class FileLock:
    """An exclusive lock on a file; the OS releases it if the process dies. release() is idempotent,
    so it can be handed to the objective and still be released safely on every way out."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._handle = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = open(self.path, "a")  # noqa: SIM115 - held across calls by design
        fcntl.flock(self._handle, fcntl.LOCK_EX)

    def release(self) -> None:
        if self._handle is not None:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None


def start_workers(target: Callable[..., None], args: tuple, count: int) -> list[BaseProcess]:
    """Start `count` processes running `target(*args, threads)`, each with an equal share of the CPU
    threads. They are spawned, not forked: a fresh interpreter gets the frozen config as an object
    (pickled), and never inherits this process's open database connections or torch thread pools."""
    threads = max(1, (os.cpu_count() or 1) // (count + 1))
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=target, args=(*args, threads)) for _ in range(count)]
    for worker in workers:
        worker.start()
    return workers
