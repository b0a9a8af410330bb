"""`python -m bench.accuracy` (`make bench-accuracy`): each recipe's accuracy on images no trial saw.

The validation split picks the winner, so its val_acc flatters it. Every recipe here runs once per
seed with a stratified 10 % of train/ held out (`run --holdout 0.1 --holdout-seed S`, seeds 0, 1, 2;
sweep.holdout), and the table gives, per recipe: the winner's val_acc, the winner's accuracy on the
held-out images (mean ± std over the seeds), the same for the winner under a narrower band (0.01)
and for the trial with the best val_acc (does the gap rule pick models that generalise better?), and
the mean time of a warm run (stage 1 or stage 2).

Stage 1 (the sweep file's, views as given) runs once per seed; each recipe's stage 2 then starts from a
copy of those stores, so the recipes differ only in what they add. One feature cache serves all: it
holds every training image, and a stage-2 recipe with fewer blocks starts from the deepest cut's.
Results go to results.jsonl in the work folder, one line per (recipe, seed), so a run can be resumed
(`--work-dir` again) and the table printed from whatever is done.

Needs CLOTHING_DATA_DIR and CLOTHING_BACKBONE_WEIGHTS. Every recipe at one --views is about 80
minutes on a 2-core CPU (a 3-block stage 2 about 2 minutes a seed); --recipe picks some. The cold
time of a recipe, as a user waits for it, is measured with `--cold RECIPE` (a fresh cache and
stores, no held-out part).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

from bench import cpu_flags
from clothing.data import ClothingDataset, build_transforms
from clothing.extract import ExtractionOptions
from clothing.features import FeatureSet, cached_features
from clothing.model import finetune_cut, load_backbone
from clothing.scoring import cached_logits, model_from_checkpoint
from sweep.holdout import HOLDOUT_FRACTION, HOLDOUT_SEEDS, holdout_rows
from sweep.pipeline import quiet_libraries
from sweep.select import TrialRecord, select_winner
from sweep.study import read_studies
from sweep.tracking import Tracker

SWEEP_FILE = "sweeps/default.yaml"  # stage 1's settings and space; BASELINE pins the rest
# What every recipe starts from, whatever the sweep file says (a recipe's own options come after
# these and win): the rule's default band for choosing stage 2's source, no stabilisers, fp32 stage 2
# without early stopping (what the rows measured before bf16 and patience existed).
BASELINE = (
    *("--tolerance", "0.02", "--finetune-schedule", "constant", "--finetune-average", "none"),
    *("--finetune-label-smoothing", "0", "--finetune-trials", "1"),
    *("--finetune-precision", "fp32", "--finetune-patience", "0"),
)
TOLERANCES = (0.02, 0.01)  # the rule's default band, and a narrower one
STAGE1_ONLY = ("--finetune-blocks", "0")
THREE_BLOCKS = ("--finetune-blocks", "3", "--finetune-lr", "1e-4", "--finetune-epochs", "6")
# Stage-2 recipes on top of the sweep file's stage 1: each option list replaces the file's stage 2.
# `make sweep`'s is "3 blocks, lr 1e-4, 6 epochs" with --views 2 (docs/benchmarks.md, "Accuracy").
RECIPES = {
    "stage 1 only": STAGE1_ONLY,
    "1 block, lr 3e-5, 10 epochs": ("--finetune-blocks", "1", "--finetune-lr", "3e-5", "--finetune-epochs", "10"),
    "3 blocks, lr 3e-5, 10 epochs": ("--finetune-blocks", "3", "--finetune-lr", "3e-5", "--finetune-epochs", "10"),
    "3 blocks, lr 1e-4, 6 epochs": ("--finetune-blocks", "3", "--finetune-lr", "1e-4", "--finetune-epochs", "6"),
    "+ cosine": (
        *("--finetune-blocks", "3", "--finetune-lr", "1e-4", "--finetune-epochs", "6"),
        *("--finetune-schedule", "cosine"),
    ),
    "+ cosine, tolerance 0.01": (
        *("--finetune-blocks", "3", "--finetune-lr", "1e-4", "--finetune-epochs", "6"),
        *("--finetune-schedule", "cosine", "--tolerance", "0.01"),
    ),
    "+ cosine + EMA": (
        *("--finetune-blocks", "3", "--finetune-lr", "1e-4", "--finetune-epochs", "6"),
        *("--finetune-schedule", "cosine", "--finetune-average", "ema"),
    ),
    "+ cosine + EMA + label smoothing 0.1": (
        *("--finetune-blocks", "3", "--finetune-lr", "1e-4", "--finetune-epochs", "6"),
        *("--finetune-schedule", "cosine", "--finetune-average", "ema", "--finetune-label-smoothing", "0.1"),
    ),
    "+ cosine + EMA, lr 3e-4": (
        *("--finetune-blocks", "3", "--finetune-lr", "3e-4", "--finetune-epochs", "6"),
        *("--finetune-schedule", "cosine", "--finetune-average", "ema"),
    ),
    "+ cosine + EMA, 10 epochs": (
        *("--finetune-blocks", "3", "--finetune-lr", "1e-4", "--finetune-epochs", "10"),
        *("--finetune-schedule", "cosine", "--finetune-average", "ema"),
    ),
    # Stage 2 at the CPU's native precision, and stopped once val_acc stalls (issue 30): the same
    # recipe in fp32 and in bf16 in one run, then bf16 with patience 1 and 2.
    "3 blocks, lr 1e-4, 6 epochs, fp32": (*THREE_BLOCKS, "--finetune-precision", "fp32"),
    "3 blocks, lr 1e-4, 6 epochs, bf16": (*THREE_BLOCKS, "--finetune-precision", "bf16"),
    "3 blocks, lr 1e-4, 6 epochs, bf16, patience 1": (
        *THREE_BLOCKS,
        "--finetune-precision",
        "bf16",
        "--finetune-patience",
        "1",
    ),
    "3 blocks, lr 1e-4, 6 epochs, bf16, patience 2": (
        *THREE_BLOCKS,
        "--finetune-precision",
        "bf16",
        "--finetune-patience",
        "2",
    ),
    "search: 3 trials, blocks 3/2/1, cosine + EMA": (
        *("--finetune-blocks", "3", "--finetune-trials", "3", "--finetune-epochs", "6"),
        *("--finetune-schedule", "cosine", "--finetune-average", "ema"),
    ),
}


def stores_in(folder: Path, cache: Path) -> list[str]:
    return [
        *("--storage", f"sqlite:///{folder / 'optuna.db'}"),
        *("--tracking-uri", f"sqlite:///{folder / 'mlflow.db'}"),
        *("--cache-dir", str(cache)),
    ]


def run_sweep(folder: Path, cache: Path, options: tuple[str, ...]) -> float:
    """One `sweep run` in its own process, as a user runs it; returns its wall time."""
    command = [sys.executable, "-m", "sweep", "run", "--quiet", "--no-system-metrics", "--config", SWEEP_FILE]
    start = time.perf_counter()
    subprocess.run([*command, *BASELINE, *options, *stores_in(folder, cache)], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def deepest_cut(options: tuple[str, ...]) -> int | None:
    blocks = int(options[options.index("--finetune-blocks") + 1]) if "--finetune-blocks" in options else 0
    return finetune_cut(blocks) if blocks else None


class HeldOutScorer:
    """Scores a trial's checkpoint on the held-out rows of train/, from the feature cache the sweep
    filled (all of train/), exactly as `best` scores a test/ split."""

    def __init__(self, data_dir: Path, cache: Path, views: int) -> None:
        self.backbone = load_backbone(os.environ["CLOTHING_BACKBONE_WEIGHTS"])
        self.train = ClothingDataset(data_dir / "train", build_transforms())
        self.cache, self.views = cache, views

    def held_out(self, seed: int, cut: int | None) -> FeatureSet:
        """The held-out rows of seed `seed`, read once per run from the cache the sweep filled."""
        options = ExtractionOptions(precision="auto", views=self.views, cut=cut, progress=False)
        full = cached_features(self.train, self.backbone, self.cache, options)
        return full.subset(holdout_rows(full.labels, HOLDOUT_FRACTION, seed)[1])

    def accuracy(self, tracker: Tracker, record: TrialRecord, part: FeatureSet) -> float:
        model = model_from_checkpoint(tracker.fetch_checkpoint(record), self.backbone)
        logits = cached_logits(model, part)
        return (logits.argmax(dim=1) == part.labels).float().mean().item()


def score_run(scorer: HeldOutScorer, folder: Path, seed: int, cut: int | None) -> dict:
    """Held-out accuracy of the winner (the default rule, and a narrower band) and of the best val_acc;
    a trial several rules chose is scored once."""
    records = read_studies(f"sqlite:///{folder / 'optuna.db'}", "clothing").records()
    tracker = Tracker(f"sqlite:///{folder / 'mlflow.db'}")
    chosen = {f"tolerance {t:g}": select_winner(records, t) for t in TOLERANCES}
    chosen["max val_acc"] = max((r for r in records if r.state == "COMPLETE"), key=lambda r: (r.val_acc, -r.number))
    part = scorer.held_out(seed, cut)
    held_out = {r.name: scorer.accuracy(tracker, r, part) for r in {r.name: r for r in chosen.values()}.values()}
    return {rule: {"trial": r.name, "val_acc": r.val_acc, "held_out": held_out[r.name]} for rule, r in chosen.items()}


def mean_std(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {spread:.3f}"


def print_table(results: list[dict]) -> None:
    click.echo(
        "| recipe | seeds | held-out (winner) | val_acc (winner) | held-out (winner, tolerance 0.01) "
        "| held-out (max-val_acc trial) | warm time |"
    )
    click.echo("| --- | --- | --- | --- | --- | --- | --- |")
    for name in dict.fromkeys(r["recipe"] for r in results):
        rows = [r for r in results if r["recipe"] == name]

        def column(rule: str, key: str = "held_out", rows=rows) -> str:
            return mean_std([r["scores"][rule][key] for r in rows])

        click.echo(
            f"| {name} | {len(rows)} | {column('tolerance 0.02')} | {column('tolerance 0.02', 'val_acc')} "
            f"| {column('tolerance 0.01')} | {column('max val_acc')} "
            f"| {statistics.mean(r['seconds'] for r in rows):.0f} s |"
        )


def run_folder(root: Path, name: str, views: int, seed: int) -> Path:
    return root / f"{name.replace(' ', '_').replace('/', '-')}-views{views}-seed{seed}"


@click.command()
@click.option("--work-dir", type=click.Path(path_type=Path), default=None, help="Keep stores and results here.")
@click.option("--recipe", "recipes", multiple=True, type=click.Choice(list(RECIPES)), help="Only these (repeatable).")
@click.option("--views", default=3, show_default=True, help="Cached views per training image (stage 1 and 2).")
@click.option("--cold", type=click.Choice(list(RECIPES)), default=None, help="Time this recipe cold instead.")
@click.option("--rescore", is_flag=True, help="Only score the runs in --work-dir again and print the tables.")
def main(work_dir: Path | None, recipes: tuple[str, ...], views: int, cold: str | None, rescore: bool) -> None:
    if not (os.environ.get("CLOTHING_DATA_DIR") and os.environ.get("CLOTHING_BACKBONE_WEIGHTS")):
        raise click.ClickException("set CLOTHING_DATA_DIR and CLOTHING_BACKBONE_WEIGHTS to the real data and weights")
    quiet_libraries()
    root = work_dir or Path(tempfile.mkdtemp(prefix="bench-accuracy-"))
    root.mkdir(parents=True, exist_ok=True)
    if cold is not None:
        folder = Path(tempfile.mkdtemp(prefix="cold-", dir=root))
        seconds = run_sweep(folder, folder / "cache", (*RECIPES[cold], "--views", str(views)))
        click.echo(f"{cold}, views {views}, cold: {seconds:.0f} s on a CPU with {cpu_flags()}")
        return
    cache, results_file = root / "cache", root / "results.jsonl"
    done = [json.loads(line) for line in results_file.read_text().splitlines()] if results_file.exists() else []
    scorer = HeldOutScorer(Path(os.environ["CLOTHING_DATA_DIR"]), cache, views)
    if rescore:  # the scores again, from the stores each run left (e.g. after adding a rule here)
        for result in done:
            folder = run_folder(root, result["recipe"], result["views"], result["seed"])
            scorer.views = result["views"]
            result["scores"] = score_run(scorer, folder, result["seed"], deepest_cut(RECIPES[result["recipe"]]))
        results_file.write_text("".join(json.dumps(r) + "\n" for r in done))
        for each in sorted({r["views"] for r in done}):
            click.echo(f"\nviews {each}:")
            print_table([r for r in done if r["views"] == each])
        return
    for name in recipes or RECIPES:
        for seed in HOLDOUT_SEEDS:
            if any(r["recipe"] == name and r["seed"] == seed and r["views"] == views for r in done):
                continue
            holdout = ("--holdout", str(HOLDOUT_FRACTION), "--holdout-seed", str(seed), "--views", str(views))
            base = root / f"stage1-views{views}-seed{seed}"
            if not (base / "optuna.db").exists():
                stage1_seconds = run_sweep(base, cache, (*STAGE1_ONLY, *holdout))
                (base / "seconds").write_text(f"{stage1_seconds}")
            folder = run_folder(root, name, views, seed)
            shutil.rmtree(folder, ignore_errors=True)
            shutil.copytree(base, folder)
            seconds = run_sweep(folder, cache, (*RECIPES[name], *holdout))
            if RECIPES[name] == STAGE1_ONLY:
                seconds = float((base / "seconds").read_text())
            result = {"recipe": name, "seed": seed, "views": views, "seconds": seconds}
            result["scores"] = score_run(scorer, folder, seed, deepest_cut(RECIPES[name]))
            done.append(result)
            with results_file.open("a") as out:
                out.write(json.dumps(result) + "\n")
            click.echo(json.dumps(result))
    print_table([r for r in done if r["views"] == views])
    click.echo(f"\nstores in {root}; CPU flags: {cpu_flags()}")


if __name__ == "__main__":
    main()
