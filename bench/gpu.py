"""`python -m bench.gpu`: the CUDA path against the CPU path on one machine, in one run.

Needs CLOTHING_DATA_DIR and CLOTHING_BACKBONE_WEIGHTS. On a machine with a GPU it measures:
- extraction on the CPU (exact, the reference, and auto) and on CUDA (fp32 and auto), with each
  one's smallest cosine to the CPU reference over validation;
- a 20x10 sweep on warm features, on CUDA and on the CPU;
- the `make sweep` recipe from a cold cache on CUDA (views, stage 2), its winner exported by
  `best --export` and that file predicted on the CPU by `predict`.
It prints a markdown table; every figure is from this run on this machine.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import torch
from torch import nn

from bench import PLAIN
from clothing.data import ClothingDataset, build_transforms
from clothing.extract import ExtractionOptions
from clothing.features import cached_features
from clothing.model import load_backbone
from sweep.config import SweepConfig, read_sweep_file
from sweep.pipeline import quiet_libraries, run_sweep

RECIPE = ()  # make sweep's: the defaults


def extraction_rows(train, val, backbone, work: Path, gpu: str) -> list[tuple[str, str, str]]:
    rows, reference = [], None
    for device, precision in (("cpu", "exact"), ("cpu", "auto"), (gpu, "fp32"), (gpu, "auto")):
        options = ExtractionOptions(device=device, precision=precision, progress=False)
        cache = work / f"cache-{device}-{precision}"  # the same folder for cpu auto and a cpu dry run's
        start = time.perf_counter()
        cached_features(train, backbone, cache, options)
        features = cached_features(val, backbone, cache, options)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        if reference is None:
            reference = features.plain
        cosine = nn.functional.cosine_similarity(reference, features.plain, dim=1).min().item()
        rows.append(
            (
                f"extraction, {device} {precision} ({features.precision})",
                f"{(len(train) + len(val)) / seconds:.1f} img/s, {seconds:.1f} s",
                f"min cosine vs cpu exact {cosine:.5f}",
            )
        )
    return rows


def sweep_seconds(data_dir: Path, weights: str, work: Path, device: str) -> tuple[float, float]:
    """A 20x10 sweep on features already cached for `device` (auto precision): (seconds, winner val_acc)."""
    settings, dimensions = read_sweep_file(PLAIN)
    cfg = SweepConfig.of(
        dimensions,
        quiet=True,
        **settings,
        data_dir=data_dir,
        study=f"warm-{device}",
        trials=20,
        epochs=10,
        storage=f"sqlite:///{work / 'optuna.db'}",
        tracking_uri=f"sqlite:///{work / 'mlflow.db'}",
        backbone_weights=weights,
        cache_dir=work / f"cache-{device}-auto",
        device=device,
    )
    start = time.perf_counter()
    result = run_sweep(cfg, lambda _: None)
    return time.perf_counter() - start, result.ranking.winner.val_acc


def cli_rows(data_dir: Path, weights: str, work: Path, gpu: str) -> list[tuple[str, str, str]]:
    """`make sweep`'s commands on CUDA from a cold cache, in fresh processes, as a user runs them."""
    stores = [
        f"--storage=sqlite:///{work / 'cli-optuna.db'}",
        f"--tracking-uri=sqlite:///{work / 'cli-mlflow.db'}",
    ]
    common = [*stores, f"--data-dir={data_dir}", f"--backbone-weights={weights}"]
    run = [sys.executable, "-m", "sweep", "run", "--quiet", "--device", gpu, *RECIPE, *common]
    run.append(f"--cache-dir={work / 'cli-cache'}")
    start = time.perf_counter()
    swept = subprocess.run(run, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if swept.returncode:
        return [(f"make sweep recipe, {gpu}, cold", "FAILED", swept.stderr.strip()[-300:].replace("\n", " / "))]
    model = work / "model.pt"
    best = subprocess.run(
        [sys.executable, "-m", "sweep", "best", "--device", gpu, "--export", str(model), *common],
        capture_output=True,
        text=True,
    )
    winner = next((line for line in best.stdout.splitlines() if line.startswith("Winner:")), best.stderr[-200:])
    images = sorted(str(p) for p in (data_dir / "validation").rglob("*.jpg"))[:3]
    predicted = subprocess.run(
        [sys.executable, "-m", "sweep", "predict", str(model), *images], capture_output=True, text=True
    )
    return [
        (f"make sweep recipe (20x10, 3 views, stage 2), {gpu}, cold", f"{seconds:.1f} s", winner[:200]),
        (
            "  best --export, then predict on the CPU",
            f"exit {best.returncode} / {predicted.returncode}",
            (best.stderr + predicted.stderr).strip()[-200:].replace("\n", " / "),
        ),
    ]


@click.command()
@click.option("--gpu", default="cuda", show_default=True, help="The device to compare with the CPU (cpu: a dry run).")
def main(gpu: str) -> None:
    """Print the CUDA-vs-CPU table."""
    quiet_libraries()
    if gpu == "cuda" and not torch.cuda.is_available():
        raise click.ClickException("no CUDA device here; this benchmark compares the CUDA path with the CPU")
    data_dir, weights = Path(os.environ.get("CLOTHING_DATA_DIR", "")), os.environ.get("CLOTHING_BACKBONE_WEIGHTS")
    if not (data_dir / "train").is_dir() or not weights:
        raise click.ClickException("set CLOTHING_DATA_DIR and CLOTHING_BACKBONE_WEIGHTS to the real data and weights")
    backbone = load_backbone(weights)
    work = Path(tempfile.mkdtemp(prefix="clothing-gpu-"))
    train = ClothingDataset(data_dir / "train", build_transforms())
    val = ClothingDataset(data_dir / "validation", build_transforms(), train.class_to_idx)
    rows = extraction_rows(train, val, backbone, work, gpu)
    for device in (gpu, "cpu"):
        seconds, val_acc = sweep_seconds(data_dir, weights, work, device)
        rows.append((f"sweep 20x10, warm features, {device}", f"{seconds:.1f} s", f"winner val_acc {val_acc:.3f}"))
    rows += cli_rows(data_dir, weights, work, gpu)
    name = torch.cuda.get_device_name() if gpu == "cuda" else "no GPU (dry run)"
    print(
        f"\n{name}, {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
        f"torch {torch.__version__}; {len(train)} train + {len(val)} validation images\n"
    )
    print("| figure | value | note |\n| --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
