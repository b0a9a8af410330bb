"""`python -m bench` (`make bench`): each figure against its baseline, measured in the same run.

Needs CLOTHING_DATA_DIR and CLOTHING_BACKBONE_WEIGHTS (the real dataset and weights). It takes about
35 minutes on a 2-core CPU (the PostgreSQL rows and bench.extraction's engine table included) and
prints the headline (A, B, R with its stages, D; docs/benchmarks.md, "Speed") first; `--headline`
stops there (about 10 minutes), `--limit N` uses the first N images of each class for a quick look.
"""

from __future__ import annotations

import copy
import functools
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import click
import optuna
import torch
from torch import nn

from bench import PLAIN, cpu_flags
from bench.cluster import CallTimer, server_rows
from bench.extraction import extraction_rows
from bench.notebook import notebook_epoch, notebook_pass
from bench.predict import predict_rows
from clothing.data import ClothingDataset, build_transforms
from clothing.extract import resolve_precision
from clothing.features import FeatureSet, cached_features
from clothing.model import FEATURE_DIM, ModelSpec, build_head, build_model, load_backbone, trainable_parameters
from clothing.train import FeatureBatches, set_seed, train_and_evaluate
from sweep.config import SweepConfig, read_sweep_file
from sweep.objective import AUTOCAST, TrainConfig, train_head
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
    common = ["--data-dir", str(data_dir), "--backbone-weights", str(weights)]
    common += ["--cache-dir", str(cache)] if action == "run" else []  # best reads no cache
    return [sys.executable, "-m", "sweep", action, *stores, *common, *options]


def cold_sweep(data_dir: Path, weights: Path, workdir: Path) -> tuple[float, float]:
    """A whole default-size plain sweep from a cold cache in a fresh process: (wall seconds, peak RSS GB)."""
    options = ("--quiet", "--study", "cold", "--trials", str(SWEEP_TRIALS), "--epochs", str(SWEEP_EPOCHS))
    options += ("--config", str(PLAIN))
    return timed_process(sweep_command("run", data_dir, weights, workdir, *options))


def cold_recipe(data_dir: Path, weights: Path, workdir: Path) -> tuple[float, float, dict[str, float]]:
    """What `make sweep` runs, from a cold cache: `run` (the defaults, the recipe), then `best
    --export`, each a fresh process: (wall seconds of both, the larger peak RSS in GB, the seconds of
    each stage, from the trials' own start and end times in the Optuna storage)."""
    run = sweep_command("run", data_dir, weights, workdir, "--quiet", "--study", "recipe")
    export = sweep_command("best", data_dir, weights, workdir, "--study", "recipe", "--export", str(workdir / "m.pt"))
    started = datetime.now()
    (t_run, rss_run), (t_export, rss_export) = timed_process(run), timed_process(export)
    return t_run + t_export, max(rss_run, rss_export), recipe_stages(workdir, started, t_run, t_export)


def recipe_stages(workdir: Path, started: datetime, t_run: float, t_export: float) -> dict[str, float]:
    """R split by stage: start-up and extraction (to the first trial's start), stage 1 (to its last
    trial's end), stage 2, and the rest of `run` (the closing summary, plots, trials.csv) with the
    `best --export` process."""
    storage = f"sqlite:///{workdir / 'optuna.db'}"
    stage1 = optuna.load_study(study_name="recipe", storage=storage).trials
    stage2 = optuna.load_study(study_name="recipe.finetune", storage=storage).trials
    first, last1 = min(t.datetime_start for t in stage1), max(t.datetime_complete for t in stage1)
    last2 = max(t.datetime_complete for t in stage2)
    seconds = {
        "start-up and extraction": (first - started).total_seconds(),
        "stage 1": (last1 - first).total_seconds(),
        "stage 2": (last2 - last1).total_seconds(),
    }
    seconds["publishing and export"] = t_run + t_export - sum(seconds.values())
    return seconds


def cold_first_trial(data_dir: Path, weights: Path, workdir: Path) -> float:
    """B: `run --trials 1 --epochs 1` from nothing (fresh stores and cache, a fresh process): what the
    extraction pass costs a user, start-up included."""
    options = ("--quiet", "--study", "first", "--trials", "1", "--epochs", "1", "--config", str(PLAIN))
    return timed_process(sweep_command("run", data_dir, weights, workdir, *options))[0]


def warm_sweep(data_dir: Path, weights: str, work: Path, cache: Path, study: str = "warm") -> tuple[float, float]:
    """The plain 20x10 sweep in this process on a warm feature cache, as a new study in the stores
    in `work` (made by the first call): (seconds, of which MLflow calls)."""
    settings, dimensions = read_sweep_file(PLAIN)
    cfg = SweepConfig.of(
        dimensions,
        quiet=True,
        **settings,
        data_dir=data_dir,
        study=study,
        trials=SWEEP_TRIALS,
        epochs=SWEEP_EPOCHS,
        storage=f"sqlite:///{work / 'optuna.db'}",
        tracking_uri=f"sqlite:///{work / 'mlflow.db'}",
        backbone_weights=weights,
        cache_dir=cache,
    )
    with CallTimer(Tracker) as mlflow_time:
        _, seconds = timed(run_sweep, cfg, lambda _: None)
    return seconds, mlflow_time.seconds


def head_epoch_rows(train: FeatureSet, val: FeatureSet) -> list[tuple[str, str, str]]:
    """A stage-1 head epoch (sweep.objective.train_head: 96 steps of 32, the honest train-eval pass and
    validation) for size_inner 10, 100 and 1000, against its arithmetic: the matrix products' FLOPs
    (forward 2*m*k*n; a training step about 3 forwards) at the rate this CPU runs one large fp32
    matrix product, the most that these cores can do."""
    big = torch.randn(1024, 1280), torch.randn(1280, 1000)
    torch.mm(*big)
    products, start = 20, time.perf_counter()
    for _ in range(products):
        torch.mm(*big)
    peak = products * 2 * 1024 * 1280 * 1000 / (time.perf_counter() - start)
    rows = [("head epochs: one large fp32 matrix product (the limit)", f"{peak / 1e9:.0f} GFLOP/s", "")]
    n_train, n_eval = len(train.labels), len(train.labels) + len(val.labels)
    classes = int(train.labels.max()) + 1
    xy, val_xy = (train.features, train.labels), (val.plain, val.labels)
    for size in (10, 100, 1000):
        per_image = 2 * (FEATURE_DIM * size + size * classes)
        flops = per_image * (3 * n_train + n_eval)
        config = TrainConfig(lr=1e-3, size_inner=size, epochs=3)
        train_head(replace(config, epochs=1), classes, xy, train.plain, val_xy, torch.device("cpu"))  # warm-up
        _, seconds = timed(train_head, config, classes, xy, train.plain, val_xy, torch.device("cpu"))
        rate = flops / (seconds / config.epochs)
        note = f"{flops / 1e9:.2f} GFLOP: {rate / 1e9:.1f} GFLOP/s, {100 * rate / peak:.0f} % of the limit"
        rows.append((f"head epoch, size_inner {size}", f"{seconds / config.epochs:.3f} s", note))
    return rows


def stage2_epoch_rows(n_train: int, n_val: int, classes: int, weights: str) -> list[tuple[str, str, str]]:
    """One stage-2 epoch as the recipe runs it (3 blocks, batch 32, channels-last, the honest train
    pass and validation), in fp32 and under bf16 autocast, on activations of the recipe's shape (the
    speed does not depend on their values)."""
    model = build_model(ModelSpec(tuple(map(str, range(classes))), 100, finetune_blocks=3), load_backbone(weights))
    generator = torch.Generator().manual_seed(0)
    shape = model.features[model.cut - 1].out_channels, 7, 7
    train = torch.randn(n_train, 2, *shape, generator=generator).half()
    val = torch.randn(n_val, *shape, generator=generator).half()
    labels, val_labels = torch.arange(n_train) % classes, torch.arange(n_val) % classes
    rows, seconds = [], {}
    for precision in ("fp32", "bf16", "fp32", "bf16"):  # interleaved: the VM's speed drifts
        tail = copy.deepcopy(model).tail().to(memory_format=torch.channels_last)
        batches = functools.partial(FeatureBatches, channels_last=True)
        _, took = timed(
            train_and_evaluate,
            tail,
            torch.optim.AdamW(trainable_parameters(tail), lr=1e-4, fused=True),
            batches(train, labels, 32, True, torch.Generator().manual_seed(0), views=True),
            batches(val, val_labels, 256),
            nn.CrossEntropyLoss(),
            1,
            "cpu",
            train_eval_loader=batches(train[:, 0], labels, 256),
            autocast=AUTOCAST[precision],
        )
        seconds[precision] = min(took, seconds.get(precision, took))
    for precision, took in seconds.items():
        note = f"{seconds['fp32'] / took:.2f}x fp32" if precision == "bf16" else "baseline"
        rows.append((f"stage 2 epoch, 3 blocks, {n_train} images, {precision}", f"{took:.1f} s", note))
    return rows


def headline_rows(  # noqa: PLR0913 - the figures themselves
    a: float, b: float, r: float, stages: dict[str, float], d: float, d_fresh: float
) -> list[tuple[str, str, str]]:
    """The four figures and their ratios, with R's stage split; goals: A/B >= 4, R/A <= 1.0 and
    D/A <= 0.20 on a CPU with bf16 (docs/benchmarks.md)."""
    rows = [
        ("A: the course notebook's loop over train+validation (the baseline)", f"{a:.1f} s", ""),
        ("B: cold `run --trials 1 --epochs 1` (fresh process, empty cache)", f"{b:.1f} s", f"A/B = {a / b:.2f}"),
        ("R: cold `make sweep` (run, best --export)", f"{r:.1f} s", f"R/A = {r / a:.2f}"),
    ]
    rows += [
        (f"  R: {stage}", f"{seconds:.1f} s", f"{100 * seconds / r:.0f} % of R") for stage, seconds in stages.items()
    ]
    rows.append(("D: warm plain 20x10 sweep, in process, stores already made", f"{d:.1f} s", f"D/A = {d / a:.2f}"))
    rows.append(
        ("  D with the stores made by that run (the earlier tables' D)", f"{d_fresh:.1f} s", f"{d_fresh / a:.2f} A")
    )
    return rows


def print_table(rows: list[tuple[str, str, str]]) -> None:
    width = max(len(r[0]) for r in rows)
    print(f"| {'figure'.ljust(width)} | value | against baseline / target |")
    print(f"| {'-' * width} | --- | --- |")
    for name, value, note in rows:
        print(f"| {name.ljust(width)} | {value} | {note} |")


def jobs_rows(data_dir: Path, weights: Path, workdir: Path) -> list[tuple[str, str, str]]:
    """The plain sweep on a warm cache by one process on all cores, then by one single-thread process
    per core (`--jobs N`), each a fresh `sweep run`."""
    rows, cores = [], os.cpu_count() or 1
    for jobs in (1, cores):
        sweep = ("--quiet", "--study", f"jobs{jobs}", "--trials", str(SWEEP_TRIALS), "--epochs", str(SWEEP_EPOCHS))
        sweep += ("--config", str(PLAIN))
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
@click.option("--headline", is_flag=True, help="Only A, B, R and D, their ratios and R's stages (about 10 minutes).")
def main(limit: int | None, headline: bool) -> None:
    """Print the benchmark tables: the headline (A, B, R, D), then every other figure."""
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
    print(f"bench: {n_images} images, work dir {work}", file=sys.stderr)
    machine = (
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, CPU flags {cpu_flags()}, "
        f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}; {n_images} images"
    )

    # The headline, in one run: A (the notebook's extraction loop), B, R (with its stages) and D.
    reference, a = notebook_pass({"train": train, "val": val}, backbone)
    b = cold_first_trial(data_dir, Path(weights), work / "first")
    r, peak_recipe, stages = cold_recipe(data_dir, Path(weights), work / "recipe")
    fast = {}
    fast["train"], t_train = timed(cached_features, train, backbone, work / "cache-a", progress=False)
    fast["val"], t_val = timed(cached_features, val, backbone, work / "cache-a", progress=False)
    # D twice: first as the earlier tables measured it (the stores made by this run, MLflow's schema
    # migrations included), then as a second study in those stores, which is what a user's next sweep costs.
    d_fresh, _ = warm_sweep(data_dir, weights, work, work / "cache-a", "warm-fresh-stores")
    d, d_mlflow = warm_sweep(data_dir, weights, work, work / "cache-a")
    print(f"\n{machine}\n")
    print_table(headline_rows(a, b, r, stages, d, d_fresh))
    if headline:
        return

    rows: list[tuple[str, str, str]] = []
    # 1. Extraction: the notebook's pipeline vs ours (in this process), over the same images.
    t_pass = t_train + t_val
    precision = resolve_precision("auto", torch.device("cpu"))
    engine = fast["train"].engine
    rows.append(("extraction, notebook pipeline", f"{n_images / a:.1f} img/s", f"{a:.1f} s"))
    rows.append(
        (
            f"extraction, project pipeline ({engine}, {precision}; in process)",
            f"{n_images / t_pass:.1f} img/s",
            f"{a / t_pass:.2f}x notebook",
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

    # 2. One training epoch: cached features vs the notebook's image loop, and the head epoch
    # against its arithmetic for each size_inner.
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
    rows += head_epoch_rows(fast["train"], fast["val"])
    if precision == "bf16":
        rows += stage2_epoch_rows(len(train), len(val), len(train.classes), weights)

    # 3. Whole sweeps: the plain one cold (fresh process, empty cache) and with --jobs, and D's
    # MLflow share.
    rows.append(("  peak memory of the recipe R (max RSS)", f"{peak_recipe:.2f} GB", "target < 2 GB"))
    t_cold, peak_gb = cold_sweep(data_dir, Path(weights), work / "plain")
    rows.append(
        (f"sweep {SWEEP_TRIALS}x{SWEEP_EPOCHS}, cold cache (process)", f"{t_cold:.1f} s", f"{t_cold / a:.2f}x A")
    )
    rows.append(("  peak memory of that sweep (max RSS)", f"{peak_gb:.2f} GB", "target < 2 GB"))
    rows += jobs_rows(data_dir, Path(weights), work / "plain")
    rows.append(("  tracking (MLflow) share of D", f"{100 * d_mlflow / d:.1f} %", f"{d_mlflow:.1f} s"))

    # 4. Several machines: PostgreSQL and an MLflow server against SQLite, by 1 and by 2 processes.
    rows += server_rows(data_dir, weights, work / "cache-a", work)

    # 5. The extraction engines and the decoding steps, one by one.
    rows += extraction_rows(data_dir, backbone)

    # 6. Predictions over a folder: `sweep predict --output` against the notebook's per-image loop.
    rows += predict_rows(data_dir, weights)

    print(f"\n{machine}\n")
    print_table(rows)


if __name__ == "__main__":
    main()
