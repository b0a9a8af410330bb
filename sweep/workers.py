"""The worker processes behind `--jobs N` (the guard they share is in `sweep.locks`)."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable
from multiprocessing.process import BaseProcess


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
