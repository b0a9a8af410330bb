"""`python -m bench.soak` (`make bench-soak`): the soak of tests/soak.py at 1, 4, 8 and 16 processes,
each with the faults (SIGKILLs, one of two workers at once, a PostgreSQL restart, the tracking server
down for 30 s), on tiny generated data, and the record checked after each.

Per size: trials per second against one process (over the whole soak, faults included), the peak of
connections to the Optuna database against max_connections, and the share of the finished workers'
time spent in tracking and storage calls (bench.soak_worker).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import click
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from images import calibrated_backbone, make_split  # noqa: E402 - the tests' tiny data
from servers import postgres_cluster  # noqa: E402
from soak import PG_PASSWORD, SoakPlan, run_soak  # noqa: E402

TRIALS_PER_PROCESS, EPOCHS = 4, 2


@click.command()
@click.option("--sizes", default="1,4,8,16", show_default=True, help="Numbers of worker processes, comma-separated.")
def main(sizes: str) -> None:
    """Print the soak table."""
    root = Path(tempfile.mkdtemp(prefix="clothing-bench-soak-"))
    data, weights = root / "data", root / "weights.pth"
    make_split(data / "train", per_class=4)
    make_split(data / "validation", per_class=2, seed=1000)
    torch.save(calibrated_backbone().state_dict(), weights)
    rows, base_rate = [], None
    with postgres_cluster(PG_PASSWORD) as pg:
        for n in (int(s) for s in sizes.split(",")):
            times = root / f"times-{n}"
            times.mkdir()
            os.environ["SOAK_TIMES"] = str(times)
            plan = SoakPlan(
                workers=n, trials=TRIALS_PER_PROCESS * max(n, 2), epochs=EPOCHS, entry=("-m", "bench.soak_worker")
            )
            log = run_soak(root / f"soak-{n}", pg, data, weights, plan, seed=n)
            rate = plan.trials / log.seconds
            base_rate = base_rate or rate
            shares = [json.loads(p.read_text()) for p in times.glob("*.json")]
            wall = sum(s["wall"] for s in shares) or 1.0
            tracking, storage = (100 * sum(s[k] for s in shares) / wall for k in ("tracking", "storage"))
            faults = f"{log.killed} kills ({log.double_kills} double), {log.pg_restarts} restart, {log.outages} outage"
            rows.append(
                (
                    f"{n} process(es), {plan.trials} trials x {EPOCHS} epochs",
                    f"{rate:.3f} trials/s ({rate / base_rate:.2f}x)",
                    f"{log.peak_connections} / {log.max_connections}",
                    f"{tracking:.0f} % / {storage:.0f} %",
                    f"{faults}; {log.starts} starts; exits {dict(log.exits)}; record exact",
                )
            )
            print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    header = ("processes", "trials/s (vs the first row)", "peak connections / max_connections", "tracking / storage")
    print(f"| {' | '.join(header)} | faults |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {' | '.join(row)} |")


if __name__ == "__main__":
    main()
