"""Frozen-feature extraction and its on-disk cache.

The backbone is frozen and the evaluation transform is deterministic, so an image's pooled feature
vector is a pure function of (image file, backbone weights, transform, precision). It is computed once
and cached; every trial and epoch of a sweep then trains the head on the cached vectors. The cache key
hashes all of those inputs, so changing an image, the weights or the transform misses the cache.

Augmentation keeps the cache: `views=V` extracts V fixed views of every image in the same pass (view 0
the plain image, view 1 its mirror, views 2+ the course's random rotation/crop/flip, each seeded by
(seed, image, view)), and each training epoch then draws one view per image (FeatureBatches). Partial
fine-tuning keeps it too: `cut=c` also stores the trunk's activations entering `features[c]`, the
input of the layers that train, so fine-tuning never runs the frozen part of the trunk again.

Extraction streams: batches are written into memory-mapped .npy files as they come, and the files are
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
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from clothing.data import ClothingDataset, DatasetError, build_transforms, load_image
from clothing.model import weights_fingerprint

CACHE_FORMAT = 3  # bump when the cached layout or the extraction semantics change
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
    """Cached features of one split, only the readable images."""

    features: torch.Tensor  # (N, V, 1280) float32: V views of each image, view 0 the plain image
    labels: torch.Tensor  # (N,) int64
    bad_paths: list[str]  # images that could not be read and were left out
    cache_file: Path
    cache_hit: bool
    keep: np.ndarray  # rows of the cache files that hold readable images
    activation_file: Path | None = None  # with a cut: (rows, V, C, H, W) activations entering features[cut]
    precision: str = "exact"  # the precision they were extracted in ("auto" resolved)

    @property
    def plain(self) -> torch.Tensor:
        """(N, 1280): the features of the images as evaluation sees them."""
        return self.features[:, 0]

    @property
    def views(self) -> int:
        return self.features.shape[1]

    def activations(self) -> torch.Tensor:
        """(N, V, C, H, W) activations at the cut, read from the cache only when asked for."""
        if self.activation_file is None:
            raise ValueError("these features were extracted without a cut; pass cut= to cached_features")
        return _read_rows(self.activation_file, self.keep)


def _read_rows(path: Path, keep: np.ndarray) -> torch.Tensor:
    # Read through a memory map and copy only the rows we keep: the file is never in memory twice.
    return torch.from_numpy(np.ascontiguousarray(np.load(path, mmap_mode="r")[keep]))


def view_transforms(dataset: ClothingDataset, views: int) -> list:
    """The transforms of views 0..V-1: the dataset's own, its mirror, then the course's augmentation."""
    if views < 1:
        raise ValueError(f"views must be at least 1, got {views}")
    size = _image_shape(dataset.transform)[1:]
    extra = [build_transforms(size[0], mirror=True)] + [build_transforms(size[0], train=True)] * (views - 2)
    return [dataset.transform, *extra[: views - 1]]


class TrunkOutputs(torch.nn.Module):
    """Images -> (pooled features,) or, with a cut, (activations entering features[cut], pooled
    features): one pass of the trunk gives both caches."""

    def __init__(self, features: torch.nn.Sequential, cut: int | None = None) -> None:
        super().__init__()
        cut = len(features) if cut is None else cut
        self.prefix, self.rest = features[:cut], features[cut:]
        self.with_activations = cut < len(features)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        activations = self.prefix(images)
        pooled = torch.flatten(torch.nn.functional.adaptive_avg_pool2d(self.rest(activations), 1), 1)
        return (activations, pooled) if self.with_activations else (pooled,)


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


def cache_key(dataset: ClothingDataset, weights_id: str, precision: str, views: int = 1, seed: int = 0) -> str:
    """Hash of everything the features depend on: files (path, size, mtime), labels, weights, the
    transform of every view and the views' seed. (Activations add their cut to the file name.)"""
    digest = hashlib.sha256(
        f"format={CACHE_FORMAT};weights={weights_id};precision={precision};views={views};seed={seed}".encode()
    )
    for transform in view_transforms(dataset, views):
        digest.update(repr(transform).encode())
    for path, label in zip(dataset.image_paths, dataset.labels):
        stat = os.stat(path)
        digest.update(f"{os.path.abspath(path)}\0{stat.st_size}\0{stat.st_mtime_ns}\0{label}\n".encode())
    return digest.hexdigest()[:24]


def _image_shape(transform) -> tuple[int, int, int]:
    size = next(t.size for t in transform.transforms if hasattr(t, "size"))
    height, width = (size, size) if isinstance(size, int) else size
    return (3, height, width)


class _TolerantImages(Dataset):
    """Yields (views of one image (V, 3, H, W), ok); an unreadable file gives zero images and
    ok=False instead of raising, so one extraction pass can report every bad file at once."""

    def __init__(self, dataset: ClothingDataset, views: int = 1, seed: int = 0) -> None:
        self.paths = dataset.image_paths
        self.transforms = view_transforms(dataset, views)
        self.seed = seed
        self.shape = _image_shape(dataset.transform)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, bool]:
        try:
            image = load_image(self.paths[idx])
        except DatasetError:
            return torch.zeros(len(self.transforms), *self.shape), False
        views = []
        for view, transform in enumerate(self.transforms):
            # Each random view is a pure function of (seed, image, view): the same on every run and
            # in any loader process, and the caller's random state is left as it was.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(hash((self.seed, idx, view)) & 0x7FFFFFFF)
                views.append(transform(image))
        return torch.stack(views), True


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
    out_files: list[Path],
    *,
    device: torch.device,
    precision: str = "fp32",
    batch_size: int = 32,
    num_workers: int | None = None,
    views: int = 1,
    seed: int = 0,
    progress: bool = True,
) -> list[int]:
    """Run `extractor` over `views` views of every image of `dataset` once, streaming its i-th output
    into `out_files[i]` (.npy, float32, shape (N, views, *output shape)).

    Returns the indices of unreadable images (their rows are zeros).
    """
    images_in = _TolerantImages(dataset, views, seed)
    batch_images = max(1, batch_size // views)  # the backbone sees about `batch_size` images at a time
    if num_workers is None:  # a loader process only pays off over more than one batch
        num_workers = default_num_workers(device) if len(dataset) > batch_images else 0
    loader = DataLoader(
        images_in,
        batch_size=batch_images,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )
    extractor = extractor.to(device, memory_format=torch.channels_last).eval()
    if device.type == "cpu" and precision == "fp32":
        extractor = optimize_for_cpu(extractor, images_in.shape)
    with torch.inference_mode():
        shapes = [out.shape[1:] for out in extractor(torch.zeros(1, *images_in.shape, device=device))]
    out_files[0].parent.mkdir(parents=True, exist_ok=True)
    tmp_files = [f.with_name(f".{f.name}.{os.getpid()}.tmp") for f in out_files]
    outputs = [
        np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(len(dataset), views, *shape))
        for tmp, shape in zip(tmp_files, shapes)
    ]
    bad: list[int] = []
    start = 0
    bar = tqdm(total=len(dataset), unit="img", desc="features", disable=not progress, file=sys.stderr)
    try:
        with torch.inference_mode(), _autocast(device, precision):
            for images, ok in loader:
                count = len(images)
                images = images.flatten(0, 1).to(device, non_blocking=True, memory_format=torch.channels_last)
                for rows, result in zip(outputs, extractor(images)):
                    rows[start : start + count] = result.float().cpu().reshape(count, views, *result.shape[1:]).numpy()
                bad.extend(start + int(i) for i in torch.nonzero(~ok).flatten())
                start += count
                bar.update(count)
        for rows in outputs:
            rows.flush()
        del outputs, rows
        for tmp, out in zip(tmp_files, out_files):
            os.replace(tmp, out)
    finally:
        bar.close()
        for tmp in tmp_files:
            tmp.unlink(missing_ok=True)
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
    views: int = 1,
    seed: int = 0,
    cut: int | None = None,
    skip_bad_images: bool = False,
    progress: bool = True,
) -> FeatureSet:
    """Features of `dataset` (and, with `cut`, the activations entering `features[cut]`) from the
    cache, extracting them first on a miss.

    Unreadable images raise BadImagesError listing all of them, unless `skip_bad_images`.
    """
    device = torch.device(device)
    precision = resolve_precision(precision, device)
    key = cache_key(dataset, weights_fingerprint(backbone), precision, views, seed)
    cache_dir = Path(cache_dir)
    cache_file = cache_dir / f"features-{key}.npy"
    # A pass with a cut also writes the features, so a later run without fine-tuning reuses them.
    activation_file = cache_dir / f"activations-{key}-cut{cut}.npy" if cut is not None else None
    bad_file = cache_file.with_suffix(".bad.json")
    out_files = [f for f in (activation_file, cache_file) if f is not None]
    hit = bad_file.is_file() and all(f.is_file() for f in out_files)
    if not hit:
        bad = extract_features(
            dataset,
            TrunkOutputs(backbone.features, cut),
            out_files,
            device=device,
            precision=precision,
            batch_size=batch_size,
            num_workers=num_workers,
            views=views,
            seed=seed,
            progress=progress,
        )
        bad_file.write_text(json.dumps(bad))
    bad = json.loads(bad_file.read_text())
    bad_paths = [dataset.image_paths[i] for i in bad]
    if bad_paths and not skip_bad_images:
        raise BadImagesError(bad_paths)
    keep = np.setdiff1d(np.arange(len(dataset)), np.asarray(bad, dtype=np.int64))
    labels = torch.as_tensor(dataset.labels, dtype=torch.long)[torch.from_numpy(keep)]
    features = _read_rows(cache_file, keep)
    return FeatureSet(features, labels, bad_paths, cache_file, hit, keep, activation_file, precision)


class FeatureBatches:
    """Mini-batches of in-memory (features, labels), reshuffled every epoch.

    Same order as a DataLoader with `shuffle=True, generator=generator` (both draw one randperm per
    epoch), but it slices whole tensors instead of collating samples one by one, which matters when
    a batch of the head costs less than the collation. With `views=True` the features are
    (N, V, ...) and every epoch draws one view per sample (after the shuffle, from the same generator).
    """

    def __init__(
        self,
        features: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        views: bool = False,
    ) -> None:
        if views and features.shape[1] == 1:  # one view: nothing to draw, same batches as plain rows
            features, views = features[:, 0], False
        self.features, self.labels = features, labels
        self.batch_size, self.shuffle, self.generator, self.views = batch_size, shuffle, generator, views

    def __len__(self) -> int:
        return -(-len(self.labels) // self.batch_size)

    def __iter__(self):
        n = len(self.labels)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        if self.views:
            view = torch.randint(self.features.shape[1], (n,), generator=self.generator)
        for start in range(0, n, self.batch_size):
            if not self.shuffle and not self.views:  # plain slices: no copy
                yield self.features[start : start + self.batch_size], self.labels[start : start + self.batch_size]
                continue
            idx = order[start : start + self.batch_size]
            rows = self.features[idx, view[idx]] if self.views else self.features[idx]
            yield rows, self.labels[idx]
