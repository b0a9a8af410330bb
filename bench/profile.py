"""`python -m bench.profile`: where a cold `make sweep` spends its time, stage by stage.

One cold run as `make sweep` runs it (fresh stores and feature cache in a temporary folder, all of
train/; `--config` a sweep file, as `SWEEP_OPTIONS` passes it), split into: start-up and imports (a
fresh `python -m sweep --help`), the extraction of each split (the pooled features, and with stage 2
the activations at the cut, in one pass), stage 1, stage 2 by epoch (training steps, validation, the
honest train pass, and the epoch's logging and weights copy), the trial's checkpoint and curves,
publishing, and `best --export` in its own process. The sweep runs in this process with timers
wrapped around those functions from here: nothing in sweep/ or clothing/ knows of them.

Needs CLOTHING_DATA_DIR and CLOTHING_BACKBONE_WEIGHTS. About 5 to 8 minutes with sweeps/thorough.yaml
on a 2-core CPU.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import click

import clothing.features
import clothing.train
import sweep.objective
import sweep.pipeline
from bench import cpu_flags
from sweep.config import SweepConfig, read_sweep_file
from sweep.pipeline import quiet_libraries, run_sweep
from sweep.tracking import Tracker


class StageClock:
    """Seconds by stage name, from timers wrapped around the functions a sweep calls."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.stage2 = False  # inside run_stage2: its epochs are stage 2's
        self.epoch = 0
        self.passes = iter(())  # what the loop's next pass without an optimizer is

    def wrap(self, owner, attr: str, name_of) -> None:
        """Time every call of `owner.attr` under `name_of(*args)` (None: not counted)."""
        original = getattr(owner, attr)

        @functools.wraps(original)
        def timed(*args, **kwargs):
            name, start = name_of(*args), time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                if name is not None:
                    self.seconds[name] += time.perf_counter() - start

        setattr(owner, attr, timed)

    def epoch_pass(self, model, loader, criterion, device, optimizer, *rest) -> str:
        """train_and_evaluate's passes in its order: training, then validation, then the honest train pass."""
        if optimizer is not None:
            self.epoch += 1
            self.passes = iter(("validation", "honest train pass"))
            kind = "training steps"
        else:
            kind = next(self.passes)
        return f"stage 2, epoch {self.epoch}: {kind}" if self.stage2 else "stage 1: the trials' epochs"

    def in_stage2(self, *_args) -> str:
        self.stage2, self.epoch = True, 0
        return "stage 2: in all"

    def by_stage(self, stage1: str | None, stage2: str):
        """A `name_of` that names a call by the stage it falls in (stage 1's None: not counted)."""
        return lambda *_: stage2 if self.stage2 else stage1


def instrument(clock: StageClock) -> None:
    clock.wrap(clothing.features, "extract_features", lambda dataset, *_: f"extraction: {dataset.root.name}")
    clock.wrap(sweep.pipeline, "prepare", lambda *_: "prepare: in all")
    clock.wrap(sweep.pipeline, "run_stage1", lambda *_: "stage 1: in all")
    clock.wrap(sweep.pipeline, "run_stage2", clock.in_stage2)
    clock.wrap(sweep.pipeline, "publish", lambda *_: "publishing (ranking, parent run, plots)")
    clock.wrap(clothing.train, "_run_epoch", clock.epoch_pass)
    epoch_records = clock.by_stage(None, "stage 2: epoch logging and weights copies")
    clock.wrap(Tracker, "log_epoch", epoch_records)
    clock.wrap(sweep.objective.BestEpoch, "update", epoch_records)
    checkpoints = clock.by_stage("stage 1: checkpoints and curves", "stage 2: checkpoint and curves")
    clock.wrap(sweep.objective.TrackedObjective, "_record_best", checkpoints)


def process_seconds(*command: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "sweep", *command], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def rows(clock: StageClock, run: float, startup: float, export: float) -> list[tuple[str, float]]:
    """The table's rows in the order a sweep runs, each "in all" row followed by its parts."""
    s = clock.seconds
    extraction = sum(v for k, v in s.items() if k.startswith("extraction"))
    table = [("start-up and imports (python -m sweep --help)", startup)]
    table += [("prepare: in all", s["prepare: in all"])]
    table += [(k, v) for k, v in s.items() if k.startswith("extraction")]
    table += [("prepare: the rest (inputs, stores, parent run)", s["prepare: in all"] - extraction)]
    table += [(k, s[k]) for k in ("stage 1: in all", "stage 1: the trials' epochs", "stage 1: checkpoints and curves")]
    stage2 = [(k, v) for k, v in s.items() if k.startswith("stage 2")]
    if s.get("stage 2: in all"):
        parts = sum(v for k, v in stage2 if k != "stage 2: in all")
        table += [("stage 2: in all", s["stage 2: in all"])]
        table += sorted((k, v) for k, v in stage2 if k != "stage 2: in all")
        table += [("stage 2: the rest (model, activations, run)", s["stage 2: in all"] - parts)]
    table += [("publishing (ranking, parent run, plots)", s["publishing (ranking, parent run, plots)"])]
    table += [("sweep run, in this process", run), ("best --export (its own process)", export)]
    return table + [("cold make sweep: start-up + run + export", startup + run + export)]


@click.command()
@click.option(
    "--config", "sweep_file", type=click.Path(exists=True, path_type=Path), default=None, help="A sweep file."
)
def main(sweep_file: Path | None) -> None:
    if not (os.environ.get("CLOTHING_DATA_DIR") and os.environ.get("CLOTHING_BACKBONE_WEIGHTS")):
        raise click.ClickException("set CLOTHING_DATA_DIR and CLOTHING_BACKBONE_WEIGHTS to the real data and weights")
    os.environ["MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING"] = "false"
    quiet_libraries()
    settings, dimensions = read_sweep_file(sweep_file) if sweep_file else ({}, None)
    startup = process_seconds("--help")
    clock = StageClock()
    instrument(clock)
    with tempfile.TemporaryDirectory(prefix="bench-profile-") as tmp:
        stores = {"storage": f"sqlite:///{tmp}/optuna.db", "tracking_uri": f"sqlite:///{tmp}/mlflow.db"}
        data = {"data_dir": Path(os.environ["CLOTHING_DATA_DIR"]), "cache_dir": Path(tmp) / "cache"}
        data["backbone_weights"] = os.environ["CLOTHING_BACKBONE_WEIGHTS"]
        cfg = SweepConfig.of(dimensions, quiet=True, **{**settings, **stores, **data})
        start = time.perf_counter()
        result = run_sweep(cfg, click.echo)
        run = time.perf_counter() - start
        options = ("--storage", stores["storage"], "--tracking-uri", stores["tracking_uri"])
        export = process_seconds("best", "--export", f"{tmp}/model.pt", *options)
    total = startup + run + export
    click.echo(f"\nwinner: {result.ranking.winner.name}; CPU flags: {cpu_flags()}; {time.strftime('%Y-%m-%d')}")
    click.echo("| stage | seconds | share of the cold run |\n| --- | --- | --- |")
    for name, seconds in rows(clock, run, startup, export):
        click.echo(f"| {name} | {seconds:.1f} | {seconds / total:.0%} |")


if __name__ == "__main__":
    main()
