"""A soak worker for `python -m bench.soak`: the `sweep` command line with its tracking and storage
calls timed (bench.cluster.CallTimer, main thread); at exit it writes the seconds to
$SOAK_TIMES/<pid>.json. A SIGKILLed worker writes nothing: the shares are those of the workers that
finished."""

from __future__ import annotations

import atexit
import json
import os
import time
from pathlib import Path

import optuna

from bench.cluster import CallTimer
from sweep.cli import cli
from sweep.tracking import Tracker


def main() -> None:
    tracking, storage = CallTimer(Tracker).__enter__(), CallTimer(optuna.storages.RDBStorage).__enter__()
    start = time.perf_counter()

    def write() -> None:
        times = {"wall": time.perf_counter() - start, "tracking": tracking.seconds, "storage": storage.seconds}
        (Path(os.environ["SOAK_TIMES"]) / f"{os.getpid()}.json").write_text(json.dumps(times))

    atexit.register(write)
    cli(prog_name="sweep")


if __name__ == "__main__":
    main()
