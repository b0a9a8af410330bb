"""`python -m bench.accuracy` (`make bench-accuracy`): what each accuracy technique adds, and costs.

Runs the sweep once per row, each adding one technique to the row above, each from a cold feature
cache in its own folder (so a row's time is what a user of those options waits), and prints a table:
the winner's val_acc and gap under the default rule, the best val_acc of any trial, and wall time.
The last row scores the final winner with test-time augmentation (`best --tta`).

Needs CLOTHING_DATA_DIR and CLOTHING_BACKBONE_WEIGHTS; about 25 minutes on a 2-core CPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

from sweep.pipeline import quiet_libraries
from sweep.select import select_winner
from sweep.study import load_studies, trial_records

# Each row adds one technique to the one above it; the last is the Makefile's `make sweep`.
ROWS = (
    ("head only (the seed's search)", ()),
    ("+ dropout searched", ("--search", "dropout")),
    ("+ 3 cached views", ("--search", "dropout", "--views", "3")),
    ("+ stage 2: last block fine-tuned", ("--search", "dropout", "--views", "3", "--finetune-blocks", "1")),
)


def run_row(work: Path, options: tuple[str, ...]) -> tuple[float, dict]:
    stores = {
        "--storage": f"sqlite:///{work / 'optuna.db'}",
        "--tracking-uri": f"sqlite:///{work / 'mlflow.db'}",
        "--cache-dir": str(work / "cache"),
    }
    command = [sys.executable, "-m", "sweep", "run", "--quiet", *options]
    command += [item for pair in stores.items() for item in pair]
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start, stores


@click.command()
@click.option("--work-dir", type=click.Path(path_type=Path), default=None, help="Keep the stores here.")
def main(work_dir: Path | None) -> None:
    if not (os.environ.get("CLOTHING_DATA_DIR") and os.environ.get("CLOTHING_BACKBONE_WEIGHTS")):
        raise click.ClickException("set CLOTHING_DATA_DIR and CLOTHING_BACKBONE_WEIGHTS to the real data and weights")
    quiet_libraries()
    root = work_dir or Path(tempfile.mkdtemp(prefix="bench-accuracy-"))
    click.echo("| sweep | winner val_acc | winner gap | winner | best val_acc of any trial | wall time |")
    click.echo("| --- | --- | --- | --- | --- | --- |")
    for index, (name, options) in enumerate(ROWS):
        seconds, stores = run_row(root / f"row{index}", options)
        records = trial_records(*load_studies("clothing", stores["--storage"]))
        winner = select_winner(records)
        best = max(r.val_acc for r in records if r.val_acc is not None)
        click.echo(
            f"| {name} | {winner.val_acc:.3f} | {winner.gap:+.3f} | {winner.name} | {best:.3f} | {seconds:.0f} s |"
        )
    start = time.perf_counter()
    output = subprocess.run(
        [sys.executable, "-m", "sweep", "best", "--tta", *[item for pair in stores.items() for item in pair]],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    tta = next(line for line in output.splitlines() if "with TTA" in line)
    click.echo(f"| + TTA on that winner (`best --tta`) | {tta} | | | | {time.perf_counter() - start:.0f} s |")
    click.echo(f"\nstores in {root}")


if __name__ == "__main__":
    main()
