"""`python -m bench.cluster` (also part of `make bench`): the sweep against PostgreSQL and an MLflow
tracking server (basic-auth, artifacts over HTTP), by 1 and by 2 processes, against the SQLite default.

Every row is 20 trials x 10 epochs on the real data with a warm feature cache, run as `python -m sweep
run` in a fresh process, so rows compare like with like. The share of time in tracking and storage
calls comes from one more in-process run per store, with the calls timed (outermost calls, main thread).
PostgreSQL and the server are throwaway ones (bench/servers.py, as the tests start them), started on free ports.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import click
import optuna

from bench import PLAIN
from bench.servers import mlflow_server, postgres_cluster
from sweep.config import SweepConfig, read_sweep_file
from sweep.pipeline import quiet_libraries, run_sweep
from sweep.tracking import Tracker

TRIALS, EPOCHS = 20, 10
PG_PASSWORD, ADMIN_PASSWORD = "bench-pg-password", "bench-admin-password"


class CallTimer:
    """Adds up the wall time spent inside the public methods of `cls` (outermost calls of the main
    thread only: Optuna's heartbeat thread writes on its own and does not hold up training)."""

    def __init__(self, cls: type) -> None:
        self.cls, self.seconds, self.calls, self._depth, self._saved = cls, 0.0, 0, 0, {}

    def __enter__(self) -> CallTimer:
        for name, attr in vars(self.cls).items():
            if not name.startswith("_") and callable(attr):
                self._saved[name] = attr
                setattr(self.cls, name, self._wrap(attr))
        return self

    def __exit__(self, *exc) -> None:
        for name, attr in self._saved.items():
            setattr(self.cls, name, attr)

    def _wrap(self, method):
        @functools.wraps(method)
        def wrapper(*args, **kwargs):
            if threading.current_thread() is not threading.main_thread():
                return method(*args, **kwargs)
            self._depth += 1
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self._depth -= 1
                if self._depth == 0:
                    self.seconds += time.perf_counter() - start
                    self.calls += 1

        return wrapper


def sweep_process(data_dir: Path, weights: str, cache: Path, study: str, stores: dict, env: dict):
    """`sweep run` in a process of its own, on `stores` ({"storage": URL, "tracking": URI})."""
    storage, tracking = stores["storage"], stores["tracking"]
    command = [sys.executable, "-m", "sweep", "run", "--quiet", "--study", study, "--trials", str(TRIALS)]
    command += ["--epochs", str(EPOCHS), "--data-dir", str(data_dir), "--backbone-weights", weights]
    command += ["--cache-dir", str(cache), "--storage", storage, "--tracking-uri", tracking, "--config", str(PLAIN)]
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wall_time(processes: list[subprocess.Popen]) -> float:
    start = time.perf_counter()
    for process in processes:
        _, stderr = process.communicate()
        if process.returncode != 0:
            raise SystemExit(f"sweep failed:\n{stderr[-3000:]}")
    return time.perf_counter() - start


def in_process_shares(cfg: SweepConfig) -> tuple[float, float, float]:
    """(wall s, tracking s, storage s) of one in-process sweep."""
    with CallTimer(Tracker) as tracking, CallTimer(optuna.storages.RDBStorage) as storage:
        start = time.perf_counter()
        run_sweep(cfg, lambda _: None)
        return time.perf_counter() - start, tracking.seconds, storage.seconds


def server_rows(data_dir: Path, weights: str, cache: Path, work: Path) -> list[tuple[str, str, str]]:
    """The table's rows; `cache` must already hold the features (a warm cache)."""
    rows: list[tuple[str, str, str]] = []
    sqlite = {"storage": f"sqlite:///{work / 'optuna.db'}", "tracking": f"sqlite:///{work / 'mlflow.db'}"}
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // 2))}
    with postgres_cluster(PG_PASSWORD) as pg:
        env["PGPASSWORD"] = PG_PASSWORD
        backend = pg.url(pg.create_database("mlflow"))
        with mlflow_server(work / "server", backend, env, ADMIN_PASSWORD) as server:
            env.update(server.credentials())
            os.environ.update(PGPASSWORD=PG_PASSWORD, **server.credentials())
            remote = {"storage": pg.url(pg.create_database("optuna")), "tracking": server.uri}
            t_sqlite = wall_time([sweep_process(data_dir, weights, cache, "sqlite-1", sqlite, env=env)])
            t_one = wall_time([sweep_process(data_dir, weights, cache, "server-1", remote, env=env)])
            t_two = wall_time([sweep_process(data_dir, weights, cache, "server-2", remote, env=env) for _ in range(2)])
            shares = {}
            for label, stores in (("SQLite", sqlite), ("PostgreSQL + HTTP", remote)):
                settings, dimensions = read_sweep_file(PLAIN)
                cfg = SweepConfig.of(
                    dimensions, quiet=True, **settings, data_dir=data_dir, study=f"shares-{label[:6]}",
                    trials=TRIALS, epochs=EPOCHS, storage=stores["storage"], tracking_uri=stores["tracking"],
                    backbone_weights=weights, cache_dir=cache,
                )  # fmt: skip
                shares[label] = in_process_shares(cfg)
    name = f"sweep {TRIALS}x{EPOCHS}, warm"
    overhead = f"{100 * (t_one / t_sqlite - 1):+.0f} % vs SQLite (target <= +15 %)"
    rows.append((f"{name}, SQLite, 1 process", f"{t_sqlite:.1f} s", "baseline"))
    rows.append((f"{name}, PostgreSQL + HTTP, 1 process", f"{t_one:.1f} s", overhead))
    rows.append((f"{name}, PostgreSQL + HTTP, 2 processes", f"{t_two:.1f} s", f"{t_one / t_two:.2f}x one process"))
    for label, (wall, tracking, storage) in shares.items():
        rows.append(
            (
                f"  in process, {label}: tracking / storage calls",
                f"{100 * tracking / wall:.1f} % / {100 * storage / wall:.1f} %",
                f"{tracking:.1f} s / {storage:.1f} s of {wall:.1f} s",
            )
        )
    return rows


@click.command()
def main() -> None:
    """Print the server rows of the benchmark table (warms its own cache first)."""
    quiet_libraries()
    from clothing.data import ClothingDataset, build_transforms
    from clothing.features import cached_features
    from clothing.model import load_backbone

    data_dir, weights = Path(os.environ.get("CLOTHING_DATA_DIR", "")), os.environ.get("CLOTHING_BACKBONE_WEIGHTS")
    if not (data_dir / "train").is_dir() or not weights:
        raise click.ClickException("set CLOTHING_DATA_DIR and CLOTHING_BACKBONE_WEIGHTS to the real data and weights")
    work = Path(tempfile.mkdtemp(prefix="clothing-bench-cluster-"))
    backbone = load_backbone(weights)
    train = ClothingDataset(data_dir / "train", build_transforms())
    cached_features(train, backbone, work / "cache", progress=False)
    val = ClothingDataset(data_dir / "validation", build_transforms(), train.class_to_idx)
    cached_features(val, backbone, work / "cache", progress=False)
    for row in server_rows(data_dir, weights, work / "cache", work):
        print(f"| {' | '.join(row)} |")


if __name__ == "__main__":
    main()
