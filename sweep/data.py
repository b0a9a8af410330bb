"""The sweep's data: both splits' cached features (training views, and activations at the fine-tuning
cut when stage 2 is on), computed once per (images, weights, transforms, views, cut)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from clothing.data import IMAGE_SIZE, ClothingDataset, DatasetError, build_transforms, shown
from clothing.extract import ExtractionOptions
from clothing.features import FeatureSet, cached_features
from clothing.model import finetune_cut, load_backbone, weights_fingerprint
from sweep.config import SweepConfig
from sweep.holdout import holdout_rows
from sweep.lineage import SplitRecord, code_tags, split_record

HOLDOUT_TAG = "sweep.held_out"


@dataclass
class SweepData:
    classes: list[str]
    train: FeatureSet
    val: FeatureSet
    backbone_id: str
    lineage: Lineage
    image_size: int = IMAGE_SIZE  # the side every image was resized to before the backbone


@dataclass(frozen=True)
class Lineage:
    """What every run of the sweep records of its origin: the splits (MLflow dataset inputs) and tags
    (git commit, package versions, the feature-cache keys it trained on)."""

    splits: tuple[SplitRecord, ...]
    tags: dict[str, str]


def split_records(data_dir: Path, train: ClothingDataset, val: ClothingDataset) -> tuple[SplitRecord, ...]:
    """The splits' records; a test/ split (scored by `best`, never seen by a trial) is read here too,
    so one that cannot be read fails before the extraction, not after it."""
    splits = [split_record("train", train), split_record("validation", val)]
    if (data_dir / "test").is_dir():
        splits.append(split_record("test", ClothingDataset(data_dir / "test", class_to_idx=train.class_to_idx)))
    return tuple(splits)


def cache_keys(features: dict[str, FeatureSet]) -> dict[str, str]:
    return {f"sweep.feature_cache.{name}": f.cache_file.stem.removeprefix("features-") for name, f in features.items()}


def load_splits(data_dir: Path, image_size: int = IMAGE_SIZE) -> tuple[ClothingDataset, ClothingDataset]:
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


def prepare_data(
    cfg: SweepConfig,
    device: torch.device,
    splits: tuple[ClothingDataset, ClothingDataset],
    backbone: torch.nn.Module | None = None,
    progress: bool = True,
) -> SweepData:
    """Cached features of the splits from `load_splits` (one backbone pass on a cold cache)."""
    train_set, val_set = splits
    records = split_records(cfg.data_dir, train_set, val_set)
    backbone = backbone if backbone is not None else load_backbone(cfg.backbone_weights)
    # With fine-tuning on, the same pass also caches the activations entering the blocks that train
    # (the most a stage-2 search may train: fewer blocks start from these).
    cut = finetune_cut(cfg.finetune_blocks) if cfg.finetune_blocks else None
    options = ExtractionOptions(
        device=str(device),
        precision=cfg.precision,
        engine=cfg.engine,
        cut=cut,
        image_size=cfg.image_size,
        skip_bad_images=cfg.skip_bad_images,
        progress=progress,
    )
    train = cached_features(train_set, backbone, cfg.cache_dir, options, views=cfg.views)
    # Validation's features come from the same engine as the training ones, whatever its own size; a
    # refit trains on them too, so it caches their views as well.
    val_views = cfg.views if cfg.refit else 1
    val = cached_features(val_set, backbone, cfg.cache_dir, options, engine=train.engine, views=val_views)
    tags = {**code_tags(), **cache_keys({"train": train, "validation": val})}
    if cfg.holdout:  # cached for all of train/, so every seed shares the cache; trials see the rest
        kept, held = holdout_rows(train.labels, cfg.holdout, cfg.holdout_seed)
        train = train.subset(kept)
        of = f"{len(held)} of {len(kept) + len(held)} training images"
        tags[HOLDOUT_TAG] = f"{of} (fraction {cfg.holdout:g}, seed {cfg.holdout_seed})"
    lineage = Lineage(records, tags)
    return SweepData(train_set.classes, train, val, weights_fingerprint(backbone), lineage, cfg.image_size)
