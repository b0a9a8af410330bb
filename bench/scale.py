"""`python -m bench.scale` (`make bench-scale`): how the costs grow with the data.

It synthesises larger training sets from the real one by fixed augmentations (each extra copy of an
image a seeded crop, flip and colour change of it, written as a JPEG of the same size), at 1x, 3x and
10x the training images; validation stays the real one. For each size, in this run:

- extraction: one cold pass over train + validation, with the activations stage 2 on 3 blocks needs;
- the cache's size on disk;
- a plain 20x10 sweep on that warm cache, in a fresh process, with its peak RSS;
- stage 2's activation memory: what one stage-2 trial holds in RAM (the activations of every cached
  view of every training image at the cut, fp16).

Cost should grow linearly: each row's last column is its value per 1x.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import zlib
from multiprocessing import Pool
from pathlib import Path

import click
import torch
from PIL import Image
from torchvision import transforms

from bench.__main__ import SWEEP_EPOCHS, SWEEP_TRIALS, sweep_command, timed_process
from clothing.data import ClothingDataset, build_transforms, load_image
from clothing.features import cached_features
from clothing.model import finetune_cut, load_backbone
from sweep.pipeline import quiet_libraries

STAGE2_BLOCKS = 3  # the make sweep recipe's


def _augmented_copy(job: tuple[str, Path, int]) -> None:
    source, target, copy = job
    augment = transforms.Compose(
        [
            transforms.RandomResizedCrop(Image.open(source).size[::-1], scale=(0.7, 1.0)),
            transforms.RandomHorizontalFlip(),
            transforms.ColorJitter(0.2, 0.2, 0.2),
        ]
    )
    torch.manual_seed(zlib.crc32(f"{source}:{copy}".encode()))  # the same copies on every run
    augment(load_image(source)).save(target, quality=90)


def synthesise(data_dir: Path, root: Path, scale: int) -> Path:
    """A data folder with `scale` times the training images (the real ones linked, the rest fixed
    augmentations of them) and the real validation images."""
    jobs = []
    for path in ClothingDataset(data_dir / "train").image_paths:
        folder = root / "train" / Path(path).parent.name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / Path(path).name).symlink_to(Path(path).resolve())
        jobs += [(path, folder / f"{Path(path).stem}-aug{k}.jpg", k) for k in range(1, scale)]
    (root / "validation").symlink_to((data_dir / "validation").resolve())
    with Pool(os.cpu_count()) as pool:
        pool.map(_augmented_copy, jobs, chunksize=64)
    return root


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def scale_rows(data_dir: Path, weights: str, scale: int, work: Path) -> list[tuple[str, str, float]]:
    """(figure, value, value per 1x of data) for one size."""
    root = synthesise(data_dir, work / f"data-{scale}x", scale) if scale > 1 else data_dir
    backbone = load_backbone(weights)
    train = ClothingDataset(root / "train", build_transforms())
    val = ClothingDataset(root / "validation", build_transforms(), train.class_to_idx)
    cache = work / f"cache-{scale}x"
    start = time.perf_counter()
    features = cached_features(train, backbone, cache, cut=finetune_cut(STAGE2_BLOCKS), progress=False)
    cached_features(val, backbone, cache, cut=finetune_cut(STAGE2_BLOCKS), progress=False)
    t_extract = time.perf_counter() - start
    on_disk = folder_bytes(cache) / 1024**3
    held = features.activations().nbytes / 1024**3
    del features
    stores = work / f"stores-{scale}x"
    stores.mkdir()
    sweep = ("--quiet", "--trials", str(SWEEP_TRIALS), "--epochs", str(SWEEP_EPOCHS))
    command = sweep_command("run", root, Path(weights), stores, *sweep, cache=cache)
    t_warm, peak = timed_process(command)
    return [
        (f"{scale}x ({len(train)} training images): extraction, cold", f"{t_extract:.1f} s", t_extract / scale),
        (f"{scale}x: cache on disk", f"{on_disk:.2f} GB", on_disk / scale),
        (f"{scale}x: sweep {SWEEP_TRIALS}x{SWEEP_EPOCHS}, warm cache (process)", f"{t_warm:.1f} s", t_warm / scale),
        (f"{scale}x: peak RSS of that sweep", f"{peak:.2f} GB", peak / scale),
        (f"{scale}x: stage-2 activations held by one trial", f"{held:.2f} GB", held / scale),
    ]


@click.command()
@click.option("--scale", "scales", type=click.IntRange(1, 100), multiple=True, default=(1, 3, 10), show_default=True)
def main(scales: tuple[int, ...]) -> None:
    """Print the scale table."""
    quiet_libraries()
    data_dir, weights = Path(os.environ.get("CLOTHING_DATA_DIR", "")), os.environ.get("CLOTHING_BACKBONE_WEIGHTS")
    if not (data_dir / "train").is_dir() or not weights:
        raise click.ClickException("set CLOTHING_DATA_DIR and CLOTHING_BACKBONE_WEIGHTS to the real data and weights")
    work = Path(tempfile.mkdtemp(prefix="clothing-scale-"))
    print(f"bench.scale: work dir {work}", file=sys.stderr)
    print("| figure | value | per 1x of data |\n| --- | --- | --- |")
    for scale in scales:
        for name, value, per_unit in scale_rows(data_dir, weights, scale, work):
            print(f"| {name} | {value} | {per_unit:.2f} |", flush=True)


if __name__ == "__main__":
    main()
