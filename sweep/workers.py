"""Several workers on one study: an exclusive lock so the trial target is met exactly, and the
worker processes behind `--jobs N`."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

from sweep.config import RUNS_DIR, SweepConfig


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


def worker_command(cfg: SweepConfig) -> list[str]:
    """The `python -m sweep run` command line of one worker process for the same study."""
    command = [sys.executable, "-m", "sweep", "run", "--jobs", "1", "--quiet", "--worker"]
    options = {
        "--data-dir": cfg.data_dir,
        "--study": cfg.study,
        "--trials": cfg.trials,
        "--epochs": cfg.epochs,
        "--storage": cfg.storage,
        "--tracking-uri": cfg.tracking_uri,
        "--backbone-weights": cfg.backbone_weights,
        "--seed": cfg.seed,
        "--batch-size": cfg.batch_size,
        "--device": cfg.device,
        "--pruner": cfg.pruner,
        "--cache-dir": cfg.cache_dir,
        "--precision": cfg.precision,
        "--views": cfg.views,
        "--finetune-blocks": cfg.finetune_blocks,  # the cut is part of the feature cache's key
    }
    for key, value in options.items():
        command += [key, str(value)]
    if cfg.skip_bad_images:
        command.append("--skip-bad-images")
    for dimension in cfg.search:
        command += ["--search", dimension]
    return command


def start_workers(cfg: SweepConfig, count: int) -> list[subprocess.Popen]:
    """Start `count` worker processes; each gets an equal share of the CPU threads."""
    threads = max(1, (os.cpu_count() or 1) // (count + 1))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    return [subprocess.Popen(worker_command(cfg), env=env) for _ in range(count)]
