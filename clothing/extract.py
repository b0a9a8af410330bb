"""The extraction engine: one pass of the frozen trunk over every view of every image.

`extract_features` streams the trunk's outputs (pooled features, and with a cut the activations
entering the blocks that train) into memory-mapped .npy files, renamed into place only when
complete: memory stays flat as the data grows, and an interrupted pass leaves nothing behind that
could pass for a result. The cache around it is clothing.features.
"""

from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from clothing.data import IMAGE_SIZE, ClothingDataset, DatasetError, load_image, view_transforms
from clothing.model import GlobalPool

# "exact": eager PyTorch in fp32, the reference. "fp32": a frozen, fused inference graph (BatchNorm
# folded into the convolutions) in fp32. "bf16": that graph under bf16 autocast. "auto": the fastest
# of these that the hardware runs natively.
PRECISIONS = ("auto", "exact", "fp32", "bf16")


@dataclass(frozen=True)
class ExtractionOptions:
    """How to extract: where, in which precision, how many views of each image, and down to which cut."""

    device: str = "cpu"
    precision: str = "auto"
    batch_size: int = 32
    num_workers: int | None = None  # None: one loader process on a small CPU (default_num_workers)
    views: int = 1  # view 0 the image as the dataset gives it, 1 its mirror, 2+ random augmentations
    seed: int = 0  # the random views' seed
    cut: int | None = None  # also keep the activations entering features[cut] (stage 2)
    image_size: int = IMAGE_SIZE
    skip_bad_images: bool = False
    progress: bool = True


class TrunkOutputs(torch.nn.Module):
    """Images -> (pooled features,) or, with a cut, (activations entering features[cut], pooled
    features): one pass of the trunk gives both caches."""

    def __init__(self, features: torch.nn.Sequential, cut: int | None = None) -> None:
        super().__init__()
        cut = len(features) if cut is None else cut
        self.prefix, self.rest = features[:cut], features[cut:]
        self.pool = GlobalPool()
        self.with_activations = cut < len(features)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        activations = self.prefix(images)
        pooled = self.pool(self.rest(activations))
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


class _TolerantImages(Dataset):
    """Yields (views of one image (V, 3, H, W), ok); an unreadable file gives zero images and
    ok=False instead of raising, so one extraction pass can report every bad file at once."""

    def __init__(self, dataset: ClothingDataset, options: ExtractionOptions) -> None:
        self.paths = dataset.image_paths
        self.transforms = view_transforms(dataset.transform, options.image_size, options.views)
        self.seed = options.seed
        self.shape = (3, options.image_size, options.image_size)

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
    dataset: ClothingDataset, extractor: torch.nn.Module, out_files: list[Path], options: ExtractionOptions
) -> list[int]:
    """Run `extractor` over `options.views` views of every image of `dataset` once, streaming its i-th
    output into `out_files[i]` (.npy, float32, shape (N, views, *output shape)).

    Returns the indices of unreadable images (their rows are zeros).
    """
    device, views = torch.device(options.device), options.views
    precision = resolve_precision(options.precision, device)
    images_in = _TolerantImages(dataset, options)
    batch_images = max(1, options.batch_size // views)  # the backbone sees about `batch_size` images at a time
    num_workers = options.num_workers
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
    bar = tqdm(total=len(dataset), unit="img", desc="features", disable=not options.progress, file=sys.stderr)
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
