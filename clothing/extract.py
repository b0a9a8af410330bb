"""The extraction pass: one pass of the frozen trunk over every view of every image.

`extract_features` streams the trunk's outputs (pooled features, and with a cut the activations
entering the blocks that train) into memory-mapped .npy files, renamed into place only when
complete: memory stays flat as the data grows, and an interrupted pass leaves nothing behind that
could pass for a result. The cache around it is clothing.features.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from clothing.data import (
    IMAGE_SIZE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ClothingDataset,
    pixel_transform,
    shown,
    try_image,
    view_transforms,
)
from clothing.engines import build_trunk, resolve_engine
from clothing.model import GlobalPool
from clothing.progress import progress

# "exact": eager PyTorch in fp32, the reference. "fp32": the engine's fastest fp32 path (clothing.engines).
# "bf16": bf16 where the engine and hardware run it. "auto": bf16 where the hardware runs it natively,
# else fp32.
PRECISIONS = ("auto", "exact", "fp32", "bf16")


@dataclass(frozen=True)
class ExtractionOptions:
    """How to extract: where, in which precision, how many views of each image, and down to which cut."""

    device: str = "cpu"
    precision: str = "auto"
    engine: str = "auto"  # clothing.engines.ENGINES
    batch_size: int = 32
    num_workers: int | None = None  # None: default_num_workers
    views: int = 1  # view 0 the image as the dataset gives it, 1 its mirror, 2+ random augmentations
    seed: int = 0  # the random views' seed
    cut: int | None = None  # also keep the activations entering features[cut] (stage 2)
    image_size: int = IMAGE_SIZE
    skip_bad_images: bool = False
    progress: bool = True


class TrunkOutputs(torch.nn.Module):
    """uint8 images -> (pooled features,) or, with a cut, (activations entering features[cut], pooled
    features): one pass of the trunk gives both caches. It normalises the pixels itself (ToTensor and
    Normalize, the same arithmetic), so that the loader sends uint8 and the engine fuses the rest."""

    def __init__(
        self,
        features: torch.nn.Sequential,
        cut: int | None = None,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        cut = len(features) if cut is None else cut
        self.prefix, self.rest = features[:cut], features[cut:]
        self.pool = GlobalPool()
        self.with_activations = cut < len(features)
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        activations = self.prefix((pixels.float() / 255 - self.mean) / self.std)
        pooled = self.pool(self.rest(activations))
        return (activations, pooled) if self.with_activations else (pooled,)


def native_bf16_cpu() -> bool:
    """Whether this CPU computes in bf16 itself (AVX-512 bf16 or AMX). oneDNN's own check
    (`torch.ops.mkldnn._is_mkldnn_bf16_supported`) also says yes on plain AVX-512, where bf16 is
    emulated: there a 7-block stage 2 in bf16 took longer than in fp32, and OpenVINO runs fp32 anyway."""
    capabilities = torch.cpu.get_capabilities()
    return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))


def resolve_precision(precision: str, device: torch.device) -> str:
    """ "auto" picks reduced precision only where the hardware runs it natively."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if native_bf16_cpu() else "fp32"


def resolve_training_precision(setting: str, feature_precision: str, device: torch.device) -> str:
    """What stage 2 trains in, "fp32" or "bf16": "auto" is bf16 only where the features are bf16 on
    hardware that runs it natively (AMX or AVX-512 bf16, a bf16 GPU), so exact and fp32 runs and AVX2
    CPUs (where bf16 is emulated, and slower than fp32) train in fp32."""
    if setting != "auto":
        return setting
    native = resolve_precision("auto", device) == "bf16"
    return "bf16" if native and resolve_precision(feature_precision, device) == "bf16" else "fp32"


class _TolerantImages(Dataset):
    """Yields (uint8 views of one image (V, 3, H, W), ok); an unreadable file gives zero images and
    ok=False instead of raising, so one extraction pass can report every bad file at once. Each image
    is decoded once for all its views."""

    def __init__(self, dataset: ClothingDataset, options: ExtractionOptions) -> None:
        self.paths = dataset.image_paths
        views = view_transforms(dataset.transform, options.image_size, options.views)
        self.pixels = [pixel_transform(view)[0] for view in views]
        self.mean, self.std = pixel_transform(views[0])[1:]
        self.seed = options.seed
        self.shape = (3, options.image_size, options.image_size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, bool]:
        image, _ = try_image(self.paths[idx])
        if image is None:
            return torch.zeros(len(self.pixels), *self.shape, dtype=torch.uint8), False
        views = [self.pixels[0](image)]
        if len(self.pixels) > 1:  # view 1 is view 0 mirrored: flipping the resized pixels gives what
            views.append(views[0].flip(-1))  # resizing the mirrored image does, bit for bit, for free
        for view in range(2, len(self.pixels)):
            # Each random view is a pure function of (seed, image, view): the same on every run and
            # in any loader process, and the caller's random state is left as it was.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(hash((self.seed, idx, view)) & 0x7FFFFFFF)
                views.append(self.pixels[view](image))
        return torch.stack(views), True


def _autocast(device: torch.device, precision: str):
    if precision in ("exact", "fp32"):
        return torch.autocast(device.type, enabled=False)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def activation_dtype(precision: str) -> type:
    """How the activations at a cut are stored: fp16 (half the disk, memory and bandwidth of stage 2;
    its 11-bit mantissa rounds finer than the bf16 extraction itself), except for `exact`, the
    reference, which keeps fp32. The pooled features, small, stay fp32."""
    return np.float32 if precision == "exact" else np.float16


def default_num_workers(device: torch.device) -> int:
    # A GPU can use several loader processes to keep itself fed. On a small CPU two loader processes
    # decode while the engine runs, at the lowest priority (yield_to_engine).
    cores = os.cpu_count() or 1
    if device.type == "cuda":
        return min(8, cores)
    return 2 if cores >= 2 else 0


def yield_to_engine(_worker_id: int) -> None:
    # The engine's threads wait for each other at every layer: a decoder that takes a core from one of
    # them stalls all. At nice 19 the loaders decode on what the engine leaves idle (measured on 2
    # cores: about 7 % faster than one loader at normal priority, more than decoding in between batches).
    os.nice(19)


def extract_features(
    dataset: ClothingDataset, trunk_layers: torch.nn.Sequential, out_files: list[Path], options: ExtractionOptions
) -> list[int]:
    """Run the trunk (`trunk_layers`, a backbone's `features`) over `options.views` views of every
    image of `dataset` once, streaming the i-th of TrunkOutputs into `out_files[i]` (.npy, shape
    (N, views, *output shape); float32, activations as `activation_dtype` says).

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
        worker_init_fn=yield_to_engine if device.type == "cpu" else None,
    )
    engine = resolve_engine(options.engine, device, precision, len(dataset) * views)
    extractor = TrunkOutputs(trunk_layers, options.cut, images_in.mean, images_in.std)
    trunk = build_trunk(extractor, engine, device, precision, images_in.shape)
    with torch.inference_mode():
        shapes = [out.shape[1:] for out in trunk(torch.zeros(1, *images_in.shape, dtype=torch.uint8))]
    out_files[0].parent.mkdir(parents=True, exist_ok=True)
    tmp_files = [f.with_name(f".{f.name}.{os.getpid()}.tmp") for f in out_files]
    dtypes = [activation_dtype(precision) if extractor.with_activations else np.float32, np.float32]
    outputs = [
        np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(len(dataset), views, *shape))
        for tmp, shape, dtype in zip(tmp_files, shapes, dtypes)
    ]
    bad: list[int] = []
    start = 0
    try:
        with (
            progress(len(dataset), f"features {shown(dataset.root.name)}", options.progress) as bar,
            torch.inference_mode(),
            _autocast(device, precision),
        ):
            for images, ok in loader:
                count = len(images)
                for rows, result in zip(outputs, trunk(images.flatten(0, 1))):
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
        for tmp in tmp_files:
            tmp.unlink(missing_ok=True)
    return bad
