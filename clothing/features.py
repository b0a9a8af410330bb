"""The on-disk cache of frozen features (and of the activations at a fine-tuning cut).

The backbone is frozen and the evaluation transform is deterministic, so an image's pooled feature
vector is a pure function of (image file, backbone weights, transform, precision, engine). It is computed once
(clothing.extract) and cached; every trial and epoch of a sweep then trains on the cached vectors. The
cache key hashes all of those inputs, so changing an image, the weights or the transform misses it.

Augmentation keeps the cache: `views=V` stores V fixed views of every image (view 0 the plain image,
view 1 its mirror, views 2+ the course's random rotation/crop/flip, each seeded by (seed, image,
view)), and each training epoch draws one view per image. Partial fine-tuning keeps it too: `cut=c`
also stores the trunk's activations entering `features[c]`, so fine-tuning never runs the frozen
part of the trunk again.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from clothing.data import ClothingDataset, DatasetError, shown, view_transforms
from clothing.engines import resolve_engine
from clothing.extract import ExtractionOptions, extract_features, resolve_precision
from clothing.model import weights_fingerprint

CACHE_FORMAT = 4  # bump when the cached layout or the extraction semantics change


class BadImagesError(DatasetError):
    """Some images could not be decoded; `paths` lists them all, not just the first."""

    def __init__(self, paths: list[str]) -> None:
        self.paths = paths
        listed = ", ".join(map(shown, paths[:5])) + (f" and {len(paths) - 5} more" if len(paths) > 5 else "")
        super().__init__(
            f"{len(paths)} unreadable image(s): {listed}; delete or replace them, "
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
    activation_file: Path | None = None  # with a cut: (rows, V, C, H, W) activations entering features[cut],
    # fp16 unless extracted in exact precision (clothing.extract.activation_dtype)
    precision: str = "exact"  # the precision they were extracted in ("auto" resolved)
    engine: str = "torch"  # the engine that extracted them (resolved)
    cut: int | None = None  # where the activations were taken

    def subset(self, rows: np.ndarray) -> FeatureSet:
        """The same cache, restricted to `rows` of these features (e.g. without a held-out part)."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        return replace(self, features=self.features[rows], labels=self.labels[rows], keep=self.keep[rows.numpy()])

    @property
    def plain(self) -> torch.Tensor:
        """(N, 1280): the features of the images as evaluation sees them."""
        return self.features[:, 0]

    @property
    def views(self) -> int:
        return self.features.shape[1]

    def activations(self) -> torch.Tensor:
        """(N, V, C, H, W) activations entering `features[cut]`, read from the cache only when asked for."""
        if self.activation_file is None:
            raise ValueError("these features were extracted without a cut; pass cut= to cached_features")
        return _read_rows(self.activation_file, self.keep)


def _read_rows(path: Path, keep: np.ndarray) -> torch.Tensor:
    # Read through a memory map and copy only the rows we keep: the file is never in memory twice.
    return torch.from_numpy(np.ascontiguousarray(np.load(path, mmap_mode="r")[keep]))


def cache_key(dataset: ClothingDataset, weights_id: str, options: ExtractionOptions) -> str:
    """Hash of everything the features depend on: files (path, size, mtime), labels, weights, the
    precision and engine (resolved: "auto" is never part of a key), the transform of every view and the views'
    seed. (Activations add their cut to the file name.)"""
    precision, engine, views, seed = options.precision, options.engine, options.views, options.seed
    digest = hashlib.sha256(
        f"format={CACHE_FORMAT};weights={weights_id};precision={precision};engine={engine};views={views};seed={seed}".encode()
    )
    for transform in view_transforms(dataset.transform, options.image_size, views):
        digest.update(repr(transform).encode())
    for path, label in zip(dataset.image_paths, dataset.labels):
        stat = os.stat(path)
        # Bytes, not text: a file name that is not valid UTF-8 is still a file.
        digest.update(os.fsencode(os.path.abspath(path)) + f"\0{stat.st_size}\0{stat.st_mtime_ns}\0{label}\n".encode())
    return digest.hexdigest()[:24]


def cached_features(
    dataset: ClothingDataset,
    backbone: torch.nn.Module,
    cache_dir: str | Path,
    options: ExtractionOptions | None = None,
    **settings,
) -> FeatureSet:
    """Features of `dataset` (and, with a cut, the activations entering `features[cut]`) from the
    cache, extracting them first on a miss. `settings` override fields of `options`
    (e.g. `precision="exact"`).

    Unreadable images raise BadImagesError listing all of them, unless `skip_bad_images`.
    """
    options = replace(options or ExtractionOptions(), **settings)
    device = torch.device(options.device)
    precision = resolve_precision(options.precision, device)
    engine = resolve_engine(options.engine, device, precision, len(dataset) * options.views)
    options = replace(options, precision=precision, engine=engine)
    key = cache_key(dataset, weights_fingerprint(backbone), options)
    cache_dir = Path(cache_dir)
    cache_file = cache_dir / f"features-{key}.npy"
    # A pass with a cut also writes the features, so a later run without fine-tuning reuses them.
    cut = options.cut
    activation_file = cache_dir / f"activations-{key}-cut{cut}.npy" if cut is not None else None
    bad_file = cache_file.with_suffix(".bad.json")
    out_files = [f for f in (activation_file, cache_file) if f is not None]
    hit = bad_file.is_file() and all(f.is_file() for f in out_files)
    if not hit:
        bad = extract_features(dataset, backbone.features, out_files, options)
        bad_file.write_text(json.dumps(bad))
    bad = json.loads(bad_file.read_text())
    bad_paths = [dataset.image_paths[i] for i in bad]
    if bad_paths and not options.skip_bad_images:
        raise BadImagesError(bad_paths)
    keep = np.setdiff1d(np.arange(len(dataset)), np.asarray(bad, dtype=np.int64))
    labels = torch.as_tensor(dataset.labels, dtype=torch.long)[torch.from_numpy(keep)]
    features = _read_rows(cache_file, keep)
    return FeatureSet(features, labels, bad_paths, cache_file, hit, keep, activation_file, precision, engine, cut)
