"""`python -m bench` (`make bench`): each figure against its baseline, measured in the same run.

Needs CLOTHING_DATA_DIR and CLOTHING_BACKBONE_WEIGHTS (the real dataset and weights). It takes about
25 minutes on a 2-core CPU (the PostgreSQL rows and bench.extraction's engine table included);
`--limit N` uses the first N images of each class for a quick look.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import torch
from torch import nn

from bench.cluster import CallTimer, server_rows
from bench.extraction import extraction_rows
from bench.notebook import notebook_epoch, notebook_features
from bench.predict import predict_rows
from clothing.data import ClothingDataset, build_transforms
from clothing.extract import resolve_precision
from clothing.features import cached_features
from clothing.model import build_head, load_backbone
from clothing.train import FeatureBatches, set_seed, train_and_evaluate
from sweep.config import SweepConfig
from sweep.pipeline import quiet_libraries, run_sweep
from sweep.tracking import Tracker

SWEEP_TRIALS, SWEEP_EPOCHS = 20, 10


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def head_val_acc(train_x, train_y, val_x, val_y, epochs: int = 10) -> float:
    """Validation accuracy of one fixed head configuration trained on the given features."""
    set_seed(42)
    head = build_head(int(train_y.max()) + 1, size_inner=100)
    batches = FeatureBatches(train_x, train_y, 32, shuffle=True, generator=torch.Generator().manual_seed(42))
    history = train_and_evaluate(
        head,
        torch.optim.Adam(head.parameters(), lr=1e-3),
        batches,
        FeatureBatches(val_x, val_y, 256),
        nn.CrossEntropyLoss(),
        epochs,
        "cpu",
    )
    return max(h["val_acc"] for h in history)


def timed_process(command: list[str]) -> tuple[float, float]:
    """Run one command in a fresh process: (wall seconds, its peak RSS in GB)."""
    result, seconds = timed(subprocess.run, ["/usr/bin/time", "-v", *command], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command[:4])} failed:\n{result.stderr[-3000:]}")
    peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr).group(1))
    return seconds, peak_kb / 1024**2


def sweep_command(
    action: str, data_dir: Path, weights: Path, workdir: Path, *options: str, cache: Path | None = None
) -> list[str]:
    """`python -m sweep ACTION` on stores in `workdir` (and its cache there, unless `cache`)."""
    stores = ["--storage", f"sqlite:///{workdir / 'optuna.db'}", "--tracking-uri", f"sqlite:///{workdir / 'mlflow.db'}"]
    workdir.mkdir(parents=True, exist_ok=True)
    cache = cache or workdir / "cache"
    common = ["--data-dir", str(data_dir), "--backbone-weights", str(weights), "--cache-dir", str(cache)]
    return [sys.executable, "-m", "sweep", action, *stores, *common, *options]


def cold_sweep(data_dir: Path, weights: Path, workdir: Path) -> tuple[float, float]:
    """A whole default-size plain sweep from a cold cache in a fresh process: (wall seconds, peak RSS GB)."""
    options = ("--quiet", "--study", "cold", "--trials", str(SWEEP_TRIALS), "--epochs", str(SWEEP_EPOCHS))
    return timed_process(sweep_command("run", data_dir, weights, workdir, *options))


def cold_recipe(data_dir: Path, weights: Path, workdir: Path) -> tuple[float, float]:
    """What `make sweep` runs, from a cold cache: `run --config sweeps/default.yaml`, then
    `best --export`, each a fresh process: (wall seconds of both, the larger peak RSS in GB)."""
    recipe = Path(__file__).resolve().parent.parent / "sweeps" / "default.yaml"
    run = sweep_command("run", data_dir, weights, workdir, "--quiet", "--study", "recipe", "--config", str(recipe))
    export = sweep_command("best", data_dir, weights, workdir, "--study", "recipe", "--export", str(workdir / "m.pt"))
    (t_run, rss_run), (t_export, rss_export) = timed_process(run), timed_process(export)
    return t_run + t_export, max(rss_run, rss_export)


def jobs_rows(data_dir: Path, weights: Path, workdir: Path) -> list[tuple[str, str, str]]:
    """The plain sweep on a warm cache by one process on all cores, then by one single-thread process
    per core (`--jobs N`), each a fresh `sweep run`."""
    rows, cores = [], os.cpu_count() or 1
    for jobs in (1, cores):
        sweep = ("--quiet", "--study", f"jobs{jobs}", "--trials", str(SWEEP_TRIALS), "--epochs", str(SWEEP_EPOCHS))
        seconds, _ = timed_process(sweep_command("run", data_dir, weights, workdir, *sweep, "--jobs", str(jobs)))
        how = "1 process, all cores" if jobs == 1 else f"{jobs} processes of 1 thread"
        rows.append((f"sweep {SWEEP_TRIALS}x{SWEEP_EPOCHS}, warm cache, --jobs {jobs} ({how})", f"{seconds:.1f} s", ""))
    return rows


def limited_copy(data_dir: Path, root: Path, limit: int) -> Path:
    """A data folder of symlinks to the first `limit` images of each class, for a quick run."""
    for split in ("train", "validation"):
        dataset = ClothingDataset(data_dir / split)
        per_class: dict[int, int] = {}
        for path, label in zip(dataset.image_paths, dataset.labels):
            per_class[label] = per_class.get(label, 0) + 1
            if per_class[label] > limit:
                continue
            link = root / split / Path(path).parent.name / Path(path).name
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(Path(path).resolve())
    return root


@click.command()
@click.option("--limit", type=int, default=None, help="Use only the first N images of each class (quick look).")
def main(limit: int | None) -> None:
    """Print the benchmark table."""
    quiet_libraries()
    data_dir, weights = Path(os.environ.get("CLOTHING_DATA_DIR", "")), os.environ.get("CLOTHING_BACKBONE_WEIGHTS")
    if not (data_dir / "train").is_dir() or not weights:
        raise click.ClickException("set CLOTHING_DATA_DIR and CLOTHING_BACKBONE_WEIGHTS to the real data and weights")
    backbone = load_backbone(weights)
    work = Path(tempfile.mkdtemp(prefix="clothing-bench-"))
    if limit:
        data_dir = limited_copy(data_dir, work / "data", limit)
    train = ClothingDataset(data_dir / "train", build_transforms())
    val = ClothingDataset(data_dir / "validation", build_transforms(), train.class_to_idx)
    n_images = len(train) + len(val)
    rows: list[tuple[str, str, str]] = []
    print(f"bench: {n_images} images, work dir {work}", file=sys.stderr)

    # 1. Extraction: the notebook's pipeline vs ours, over the same images.
    reference = {}
    reference["train"], t_nb_train = timed(notebook_features, train, backbone)
    reference["val"], t_nb_val = timed(notebook_features, val, backbone)
    t_notebook_pass = t_nb_train + t_nb_val
    fast = {}
    fast["train"], t_train = timed(cached_features, train, backbone, work / "cache-a", progress=False)
    fast["val"], t_val = timed(cached_features, val, backbone, work / "cache-a", progress=False)
    t_pass = t_train + t_val
    precision = resolve_precision("auto", torch.device("cpu"))
    engine = fast["train"].engine
    rows.append(
        ("extraction, notebook pipeline", f"{n_images / t_notebook_pass:.1f} img/s", f"{t_notebook_pass:.1f} s")
    )
    rows.append(
        (
            f"extraction, project pipeline ({engine}, {precision})",
            f"{n_images / t_pass:.1f} img/s",
            f"{t_notebook_pass / t_pass:.2f}x notebook (target >= 4x)",
        )
    )

    # Quality guard: features and a trained head against the reference pipeline.
    cosine = nn.functional.cosine_similarity(reference["val"], fast["val"].plain, dim=1).min().item()
    acc_ref = head_val_acc(reference["train"], fast["train"].labels, reference["val"], fast["val"].labels)
    acc_fast = head_val_acc(fast["train"].plain, fast["train"].labels, fast["val"].plain, fast["val"].labels)
    rows.append(("quality: min cosine vs reference (val)", f"{cosine:.6f}", "target >= 0.99"))
    rows.append(
        (
            "quality: head val_acc reference / fast",
            f"{acc_ref:.3f} / {acc_fast:.3f}",
            f"diff {abs(acc_ref - acc_fast) * 100:.1f} pt (target <= 1)",
        )
    )

    # 2. One training epoch: cached features vs the notebook's image loop.
    _, t_nb_epoch = timed(notebook_epoch, train, val, backbone)
    head = build_head(len(train.classes), 100)
    batches = FeatureBatches(fast["train"].plain, fast["train"].labels, 32, shuffle=True)
    _, t_epoch = timed(
        train_and_evaluate,
        head,
        torch.optim.Adam(head.parameters(), lr=1e-3),
        batches,
        FeatureBatches(fast["val"].plain, fast["val"].labels, 32),
        nn.CrossEntropyLoss(),
        1,
        "cpu",
    )
    rows.append(("one epoch, notebook loop (images)", f"{t_nb_epoch:.1f} s", ""))
    rows.append(("one epoch, cached features", f"{t_epoch:.3f} s", f"{t_nb_epoch / t_epoch:.0f}x faster"))

    # 3. Whole sweeps: make sweep's recipe and the plain sweep, each cold (fresh processes, empty
    # cache), and the plain one warm (cache from step 1), with MLflow's share.
    t_recipe, peak_recipe = cold_recipe(data_dir, Path(weights), work / "recipe")
    rows.append(
        (
            "make sweep recipe (run --config sweeps/default.yaml, best --export), cold",
            f"{t_recipe:.1f} s",
            f"{t_recipe / t_notebook_pass:.2f}x one notebook pass (target <= 1)",
        )
    )
    rows.append(("  peak memory of that recipe (max RSS)", f"{peak_recipe:.2f} GB", "target < 2 GB"))
    t_cold, peak_gb = cold_sweep(data_dir, Path(weights), work / "plain")
    rows.append(
        (
            f"sweep {SWEEP_TRIALS}x{SWEEP_EPOCHS}, cold cache (process)",
            f"{t_cold:.1f} s",
            f"{t_cold / t_notebook_pass:.2f}x one notebook pass (target < 1)",
        )
    )
    rows.append(("  peak memory of that sweep (max RSS)", f"{peak_gb:.2f} GB", "target < 2 GB"))
    rows += jobs_rows(data_dir, Path(weights), work / "plain")
    cfg = SweepConfig(
        data_dir=data_dir,
        study="warm",
        trials=SWEEP_TRIALS,
        epochs=SWEEP_EPOCHS,
        storage=f"sqlite:///{work / 'optuna.db'}",
        tracking_uri=f"sqlite:///{work / 'mlflow.db'}",
        backbone_weights=weights,
        cache_dir=work / "cache-a",
        quiet=True,
    )
    with CallTimer(Tracker) as mlflow_time:
        _, t_warm = timed(run_sweep, cfg, lambda _: None)
    rows.append((f"sweep {SWEEP_TRIALS}x{SWEEP_EPOCHS}, warm cache (in process)", f"{t_warm:.1f} s", "target <= 30 s"))
    rows.append(
        (
            "  tracking (MLflow) share of that sweep",
            f"{100 * mlflow_time.seconds / t_warm:.1f} %",
            f"{mlflow_time.seconds:.1f} s (target <= 10 %)",
        )
    )

    # 4. Several machines: PostgreSQL and an MLflow server against SQLite, by 1 and by 2 processes.
    rows += server_rows(data_dir, weights, work / "cache-a", work)

    # 5. The extraction engines and the decoding steps, one by one.
    rows += extraction_rows(data_dir, backbone)

    # 6. Predictions over a folder: `sweep predict --output` against the notebook's per-image loop.
    rows += predict_rows(data_dir, weights)

    print(
        f"\nMachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}; {n_images} images\n"
    )
    width = max(len(r[0]) for r in rows)
    print(f"| {'figure'.ljust(width)} | value | against baseline / target |")
    print(f"| {'-' * width} | --- | --- |")
    for name, value, note in rows:
        print(f"| {name.ljust(width)} | {value} | {note} |")


if __name__ == "__main__":
    main()
