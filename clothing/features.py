"""Frozen-feature extraction and its on-disk cache.

The backbone is frozen and the evaluation transform is deterministic, so an image's pooled feature
vector is a pure function of (image file, backbone weights, transform, precision). It is computed once
and cached; every trial and epoch of a sweep then trains the head on the cached vectors. The cache key
hashes all of those inputs, so changing an image, the weights or the transform misses the cache.

Extraction streams: batches are written into a memory-mapped .npy file as they come, and the file is
renamed into place only when complete, so memory stays flat as the data grows and an interrupted
extraction leaves nothing that could be mistaken for a cache entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset
from tqdm import tqdm

from clothing.data import ClothingDataset, DatasetError, load_image
from clothing.model import FEATURE_DIM, feature_extractor, weights_fingerprint

CACHE_FORMAT = 2  # bump when the cached layout or the extraction semantics change
# "exact": eager PyTorch in fp32, the reference. "fp32": a frozen, fused inference graph (BatchNorm
# folded into the convolutions) in fp32. "bf16": that graph under bf16 autocast. "auto": the fastest
# of these that the hardware runs natively.
PRECISIONS = ("auto", "exact", "fp32", "bf16")


class BadImagesError(DatasetError):
    """Some images could not be decoded; `paths` lists them all, not just the first."""

    def __init__(self, paths: list[str]) -> None:
        self.paths = paths
        shown = ", ".join(paths[:5]) + (f" and {len(paths) - 5} more" if len(paths) > 5 else "")
        super().__init__(
            f"{len(paths)} unreadable image(s): {shown}; delete or replace them, "
            "or pass --skip-bad-images to leave them out"
        )


@dataclass
class FeatureSet:
    """Cached features of one split: `dataset` batches (feature, label) pairs for a DataLoader."""

    features: torch.Tensor  # (N, 1280) float32, only the readable images
    labels: torch.Tensor  # (N,) int64
    bad_paths: list[str]  # images that could not be read and were left out
    cache_file: Path
    cache_hit: bool

    @property
    def dataset(self) -> TensorDataset:
        return TensorDataset(self.features, self.labels)


def resolve_precision(precision: str, device: torch.device) -> str:
    """ "auto" picks reduced precision only where the hardware runs it natively."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"


def optimize_for_cpu(extractor: torch.nn.Module, image_shape: tuple[int, ...]) -> torch.nn.Module:
    """Freeze the extractor into a fused inference graph: on a CPU without native bf16 this is the
    largest single speed-up measured (bench/), with features equal to eager fp32 up to rounding."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # torch.jit is deprecated in favour of torch.compile, which
        # costs minutes of compilation on a small CPU for a one-pass job; the jit graph costs a second.
        traced = torch.jit.trace(extractor, torch.zeros(1, *image_shape))
        return torch.jit.optimize_for_inference(traced)


def cache_key(dataset: ClothingDataset, weights_id: str, precision: str) -> str:
    """Hash of everything the features depend on: files (path, size, mtime), labels, weights, transform."""
    digest = hashlib.sha256(f"format={CACHE_FORMAT};weights={weights_id};precision={precision}".encode())
    digest.update(repr(dataset.transform).encode())
    for path, label in zip(dataset.image_paths, dataset.labels):
        stat = os.stat(path)
        digest.update(f"{os.path.abspath(path)}\0{stat.st_size}\0{stat.st_mtime_ns}\0{label}\n".encode())
    return digest.hexdigest()[:24]


class _TolerantImages(Dataset):
    """Yields (image, ok); an unreadable file gives a zero image and ok=False instead of raising,
    so one extraction pass can report every bad file at once."""

    def __init__(self, dataset: ClothingDataset) -> None:
        self.paths = dataset.image_paths
        self.transform = dataset.transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, bool]:
        try:
            image = load_image(self.paths[idx])
        except DatasetError:
            return torch.zeros(self._shape()), False
        return self.transform(image), True

    def _shape(self) -> tuple[int, ...]:
        size = next(t.size for t in self.transform.transforms if hasattr(t, "size"))
        height, width = (size, size) if isinstance(size, int) else size
        return (3, height, width)


def _autocast(device: torch.device, precision: str):
    if precision in ("exact", "fp32"):
        return torch.autocast(device.type, enabled=False)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def default_num_workers(device: torch.device) -> int:
    # On a small CPU one loader process overlaps JPEG decoding with the backbone without
    # oversubscribing the cores; a GPU can use more to keep itself fed.
    cores = os.cpu_count() or 1
    if device.type == "cuda":
        return min(8, cores)
    return 1 if cores >= 2 else 0


def extract_features(
    dataset: ClothingDataset,
    extractor: torch.nn.Module,
    out_file: Path,
    *,
    device: torch.device,
    precision: str = "fp32",
    batch_size: int = 32,
    num_workers: int | None = None,
    progress: bool = True,
) -> list[int]:
    """Run `extractor` over `dataset` once, streaming (N, 1280) float32 rows into `out_file` (.npy).

    Returns the indices of unreadable images (their rows are zeros).
    """
    if num_workers is None:  # a loader process only pays off over more than one batch
        num_workers = default_num_workers(device) if len(dataset) > batch_size else 0
    images_in = _TolerantImages(dataset)
    loader = DataLoader(
        images_in,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )
    extractor = extractor.to(device, memory_format=torch.channels_last).eval()
    if device.type == "cpu" and precision == "fp32":
        extractor = optimize_for_cpu(extractor, images_in._shape())
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp_file = out_file.with_name(f".{out_file.name}.{os.getpid()}.tmp")
    rows = np.lib.format.open_memmap(tmp_file, mode="w+", dtype=np.float32, shape=(len(dataset), FEATURE_DIM))
    bad: list[int] = []
    start = 0
    bar = tqdm(total=len(dataset), unit="img", desc="features", disable=not progress, file=sys.stderr)
    try:
        with torch.inference_mode(), _autocast(device, precision):
            for images, ok in loader:
                images = images.to(device, non_blocking=True, memory_format=torch.channels_last)
                feats = extractor(images).float().cpu().numpy()
                rows[start : start + len(feats)] = feats
                bad.extend(start + int(i) for i in torch.nonzero(~ok).flatten())
                start += len(feats)
                bar.update(len(feats))
        rows.flush()
        del rows
        os.replace(tmp_file, out_file)
    finally:
        bar.close()
        tmp_file.unlink(missing_ok=True)
    return bad


def cached_features(
    dataset: ClothingDataset,
    backbone: torch.nn.Module,
    cache_dir: str | Path,
    *,
    device: torch.device | str = "cpu",
    precision: str = "auto",
    batch_size: int = 32,
    num_workers: int | None = None,
    skip_bad_images: bool = False,
    progress: bool = True,
) -> FeatureSet:
    """Features of `dataset` from the cache, extracting them first on a miss.

    Unreadable images raise BadImagesError listing all of them, unless `skip_bad_images`.
    """
    device = torch.device(device)
    precision = resolve_precision(precision, device)
    key = cache_key(dataset, weights_fingerprint(backbone), precision)
    cache_file = Path(cache_dir) / f"features-{key}.npy"
    bad_file = cache_file.with_suffix(".bad.json")
    hit = cache_file.is_file() and bad_file.is_file()
    if not hit:
        bad = extract_features(
            dataset,
            feature_extractor(backbone),
            cache_file,
            device=device,
            precision=precision,
            batch_size=batch_size,
            num_workers=num_workers,
            progress=progress,
        )
        bad_file.write_text(json.dumps(bad))
    bad = json.loads(bad_file.read_text())
    bad_paths = [dataset.image_paths[i] for i in bad]
    if bad_paths and not skip_bad_images:
        raise BadImagesError(bad_paths)
    keep = np.setdiff1d(np.arange(len(dataset)), np.asarray(bad, dtype=np.int64))
    # Read through a memory map and copy only the rows we keep: the images are never in memory.
    features = torch.from_numpy(np.ascontiguousarray(np.load(cache_file, mmap_mode="r")[keep]))
    labels = torch.as_tensor(dataset.labels, dtype=torch.long)[torch.from_numpy(keep)]
    return FeatureSet(features, labels, bad_paths, cache_file, hit)


class FeatureBatches:
    """Mini-batches of in-memory (features, labels), reshuffled every epoch.

    Same order as a DataLoader with `shuffle=True, generator=generator` (both draw one randperm per
    epoch), but it slices whole tensors instead of collating samples one by one, which matters when
    a batch of the head costs less than the collation.
    """

    def __init__(
        self,
        features: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
    ) -> None:
        self.features, self.labels = features, labels
        self.batch_size, self.shuffle, self.generator = batch_size, shuffle, generator

    def __len__(self) -> int:
        return -(-len(self.labels) // self.batch_size)

    def __iter__(self):
        n = len(self.labels)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else None
        for start in range(0, n, self.batch_size):
            if order is None:
                yield self.features[start : start + self.batch_size], self.labels[start : start + self.batch_size]
            else:
                idx = order[start : start + self.batch_size]
                yield self.features[idx], self.labels[idx]
