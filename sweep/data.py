"""The sweep's data: both splits' cached features (training views, and activations at the fine-tuning
cut when stage 2 is on), computed once per (images, weights, transforms, views, cut), and where they
came from (the splits' digests, the code's commit, the package versions, the cache keys).

The validation split picks the winner, so the winner's val_acc flatters it. For an honest estimate a
sweep file can leave one of five stratified folds of train/ out of every trial (`holdout_fold`:
`make bench-accuracy`); the cache still holds all of train/, so the folds share it.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import torch

import clothing
from clothing.data import ClothingDataset, DatasetError, build_transforms, shown
from clothing.extract import ExtractionOptions
from clothing.features import FeatureSet, cached_features
from clothing.model import finetune_cut, weights_fingerprint
from sweep.config import HOLDOUT_FOLDS, DataSettings

HOLDOUT_TAG = "sweep.held_out"
PACKAGES = ("torch", "torchvision", "optuna", "mlflow")
CHECKOUT = Path(clothing.__file__).resolve().parent.parent  # the code's own folder, a git checkout or not


@dataclass(frozen=True)
class SplitRecord:
    """One split as MLflow's dataset inputs show it: `digest` changes when any file is added,
    removed, renamed or resized."""

    name: str  # train, validation, test
    digest: str
    source: str  # the split's folder
    profile: dict = field(default_factory=dict)  # image and class counts


@dataclass(frozen=True)
class Lineage:
    """What every run of the sweep records of its origin: the splits (MLflow dataset inputs) and tags
    (git commit, package versions, the feature-cache keys it trained on)."""

    splits: tuple[SplitRecord, ...]
    tags: dict[str, str]


@dataclass
class SweepData:
    classes: list[str]
    train: FeatureSet
    val: FeatureSet
    backbone_id: str
    lineage: Lineage
    image_size: int  # the side every image was resized to before the backbone


def load_splits(data_dir: Path, image_size: int) -> tuple[ClothingDataset, ClothingDataset]:
    """Both splits, resized to `image_size` square, refused when they cannot make a classifier (before
    any store is created)."""
    if not (data_dir / "train").is_dir():
        raise DatasetError(
            f"data folder {shown(data_dir / 'train')} does not exist; run `make data` to download the clothing "
            "dataset there, or point --data-dir (or CLOTHING_DATA_DIR) at a folder with train/ and validation/"
        )
    transform = build_transforms(image_size)
    train = ClothingDataset(data_dir / "train", transform)
    if len(train.classes) < 2:
        raise DatasetError(
            f"{shown(data_dir / 'train')} has one class folder ({shown(train.classes[0])}); a classifier needs "
            "at least two, one sub-folder per class"
        )
    val = ClothingDataset(data_dir / "validation", transform, class_to_idx=train.class_to_idx)
    return train, val


def prepare_data(  # noqa: PLR0913 - the data's settings, where to run, and what prepare has already loaded
    settings: DataSettings,
    finetune_blocks: int,
    device: torch.device,
    splits: tuple[ClothingDataset, ClothingDataset],
    backbone: torch.nn.Module,
    progress: bool = True,
) -> SweepData:
    """Cached features of the splits from `load_splits` (one backbone pass on a cold cache); with
    `finetune_blocks`, the same pass caches the activations entering the blocks that train."""
    train_set, val_set = splits
    records = split_records(settings.data_dir, train_set, val_set)
    options = ExtractionOptions(
        device=str(device),
        precision=settings.precision,
        engine=settings.engine,
        cut=finetune_cut(finetune_blocks) if finetune_blocks else None,
        image_size=settings.image_size,
        skip_bad_images=settings.skip_bad_images,
        progress=progress,
    )
    train = cached_features(train_set, backbone, settings.cache_dir, options, views=settings.views)
    # Validation picks the winner, so it sees images as the exported model does: in fp32 (exact stays
    # exact), whatever the training features' precision; on their engine, whatever its own size.
    precision = "exact" if train.precision == "exact" else "fp32"
    val = cached_features(val_set, backbone, settings.cache_dir, options, engine=train.engine, precision=precision)
    tags = {**code_tags(), **cache_keys({"train": train, "validation": val})}
    if settings.holdout_fold:  # cached for all of train/, so every fold shares the cache; trials see the rest
        kept, held = fold_rows(train.labels, settings.holdout_fold)
        train = train.subset(kept)
        of = f"{len(held)} of {len(kept) + len(held)} training images"
        tags[HOLDOUT_TAG] = f"{of} (fold {settings.holdout_fold} of {HOLDOUT_FOLDS})"
    lineage = Lineage(records, tags)
    return SweepData(train_set.classes, train, val, weights_fingerprint(backbone), lineage, settings.image_size)


def fold_rows(labels: np.ndarray | torch.Tensor, fold: int, folds: int = HOLDOUT_FOLDS) -> tuple[np.ndarray, ...]:
    """(kept rows, held-out rows), both sorted, for `fold` (1 to `folds`) of a stratified k-fold
    split: each class's rows in one fixed random order, dealt out to the folds in turn, so every fold
    holds 1/k of each class and every image is held out by exactly one fold. A class of one image is
    never held out (the trials could not learn it)."""
    if not 1 <= fold <= folds:
        raise ValueError(f"the held-out fold must be 1 to {folds}, got {fold}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(0)  # one split for every run: recipes are compared image by image
    held = []
    for label in np.unique(labels):  # sorted, so the folds do not depend on the order classes appear
        rows = rng.permutation(np.flatnonzero(labels == label))
        if len(rows) > 1:
            held.append(rows[fold - 1 :: folds])
    held_rows = np.sort(np.concatenate(held)) if held else np.empty(0, dtype=np.int64)
    return np.setdiff1d(np.arange(len(labels)), held_rows), held_rows


def split_record(name: str, split: ClothingDataset) -> SplitRecord:
    digest = hashlib.sha256()
    for path in split.image_paths:  # sorted by class, then name
        digest.update(os.fsencode(os.path.relpath(path, split.root)) + b"\0")
        digest.update(str(os.stat(path).st_size).encode() + b"\n")
    counts = {shown(c): split.labels.count(i) for c, i in split.class_to_idx.items()}
    profile = {"images": len(split.image_paths), "classes": counts}
    return SplitRecord(name, digest.hexdigest()[:16], shown(Path(split.root).resolve()), profile)


def split_records(data_dir: Path, train: ClothingDataset, val: ClothingDataset) -> tuple[SplitRecord, ...]:
    """The splits' records; a test/ split (scored by `best`, never seen by a trial) is read here too,
    so one that cannot be read fails before the extraction, not after it."""
    splits = [split_record("train", train), split_record("validation", val)]
    if (data_dir / "test").is_dir():
        splits.append(split_record("test", ClothingDataset(data_dir / "test", class_to_idx=train.class_to_idx)))
    return tuple(splits)


def cache_keys(features: dict[str, FeatureSet]) -> dict[str, str]:
    return {f"sweep.feature_cache.{name}": f.cache_file.stem.removeprefix("features-") for name, f in features.items()}


def code_tags() -> dict[str, str]:
    """The git commit of the code (and whether its tree had changes), when it runs from a checkout,
    and the versions of the packages that decide the numbers."""
    tags = {f"sweep.version.{name}": _version(name) for name in (*PACKAGES, "clothing-sweep")}
    try:
        git = ["git", "-C", str(CHECKOUT)]
        commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        status = subprocess.run(
            [*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):  # no git here
        return tags
    if commit.returncode == 0:
        tags["mlflow.source.git.commit"] = commit.stdout.strip()
        tags["sweep.git.dirty"] = str(bool(status.stdout.strip())).lower()
    return tags


def _version(name: str) -> str:
    if name == "clothing-sweep":
        return clothing.__version__
    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"
