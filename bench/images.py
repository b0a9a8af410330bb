"""Tiny generated images whose classes differ visibly, and a backbone whose features see it.

A randomly initialised MobileNetV2 hands its last layers activations of about 1e-9, so its features
carry no signal and every tiny sweep would score every trial the same. `calibrated_backbone` gives
each BatchNorm layer the statistics of images like these, which turns the same random network into a
feature extractor whose pooled features are of order 1 and separate the classes, offline and fast.
"""

from __future__ import annotations

import functools
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision import models

CLASSES = ("hat", "pants", "shoes")
ALL_CLASSES = ("hat", "pants", "shoes", "socks")


def styled_pixels(cls: int, rng: np.random.Generator, size: int = 40, noise: float = 20.0) -> np.ndarray:
    """One image of class `cls`: a class-specific pattern under noise and a random brightness.

    hat and pants are mirror images of each other (a bright left or right half), so mirroring an image
    changes what it shows: test-time augmentation then has something to change. shoes are horizontal
    stripes, socks a brighter bluish checkerboard.
    """
    y, x = np.mgrid[0:size, 0:size]
    pattern = np.zeros((size, size))
    if cls == 0:
        pattern = (x < size // 2) * 1.0
    elif cls == 1:
        pattern = (x >= size // 2) * 1.0
    elif cls == 2:
        pattern = ((y // 5) % 2) * 1.0
    else:
        pattern = (((x // 8) + (y // 8)) % 2) * 1.0
    tint = np.array([(120, 40, 40), (120, 40, 40), (40, 120, 40), (40, 40, 120)][cls % 4], dtype=float)
    base = 70 + rng.normal(0, 10) + pattern[..., None] * tint
    return np.clip(base + rng.normal(0, noise, (size, size, 3)), 0, 255).astype(np.uint8)


def write_image(path: Path, colour=(128, 128, 128), seed: int = 0, size: int = 40, mode: str = "RGB") -> Path:
    """A small noisy image of one colour; the format follows the file's extension."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour) + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).convert(mode).save(path)
    return path


def make_split(root: Path, classes=CLASSES, per_class: int = 4, seed: int = 0, noise: float = 20.0) -> Path:
    """root/<class>/NN.jpg, `per_class` styled images of each class (class index from ALL_CLASSES)."""
    for name in classes:
        cls = ALL_CLASSES.index(name)
        for i in range(per_class):
            rng = np.random.default_rng(seed + 1000 * cls + i)
            path = root / name / f"{i:02d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(styled_pixels(cls, rng, noise=noise)).save(path, quality=95)
    return root


def calibrated_backbone(images: torch.Tensor | None = None, seed: int = 0) -> models.MobileNetV2:
    """A random MobileNetV2 whose BatchNorm statistics match `images` (default: styled images of every
    class, preprocessed as evaluation does), in eval mode; a new module on every call."""
    if images is not None:
        return _calibrate(images, seed)
    torch.manual_seed(seed)  # leaves the global generator where a calibration from scratch does
    backbone = models.mobilenet_v2(weights=None)
    backbone.load_state_dict(_calibrated_on_styled_images(seed))
    return backbone.eval()


@functools.cache
def _calibrated_on_styled_images(seed: int) -> dict[str, torch.Tensor]:
    """The default calibration's weights, computed once per process (about 2 s of CPU each time, and
    the tests ask for it a dozen times)."""
    from clothing.data import build_transforms

    rng = np.random.default_rng(12345)
    transform = build_transforms()
    images = torch.stack([transform(Image.fromarray(styled_pixels(i % 4, rng))) for i in range(32)])  # 8 a class
    return _calibrate(images, seed).state_dict()


def _calibrate(images: torch.Tensor, seed: int) -> models.MobileNetV2:
    torch.manual_seed(seed)
    backbone = models.mobilenet_v2(weights=None)
    momenta = {}
    for layer in backbone.modules():
        if isinstance(layer, nn.BatchNorm2d):
            momenta[layer] = layer.momentum
            layer.momentum = None  # cumulative average over the calibration pass
    backbone.train()
    with torch.no_grad():
        backbone.features(images)
    for layer, momentum in momenta.items():
        layer.momentum = momentum
    return backbone.eval()


def write_bomb_png(path: Path, side: int = 14_000) -> Path:
    """A valid PNG header that claims side x side pixels (a decompression bomb to Pillow: 196 M pixels
    is over twice its MAX_IMAGE_PIXELS), with almost no data: a few hundred bytes on disk."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit greyscale
    body = zlib.compress(b"\0" * (side // 8 + 1) * 4)  # a few rows; Pillow refuses before reading them
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b""))
    return path


def write_hostile_file(path: Path, kind: str, seed: int = 0) -> Path:
    """A file an image folder should never hold, or one that only looks odd. `kind` is one of
    HOSTILE_KINDS; the unreadable ones are UNREADABLE_KINDS."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    if kind == "random bytes":
        path.write_bytes(rng.integers(0, 256, int(rng.integers(0, 4000)), dtype=np.uint8).tobytes())
    elif kind == "truncated jpeg":
        full = write_image(path.with_suffix(".full.jpg"), seed=seed, size=64).read_bytes()
        path.with_suffix(".full.jpg").unlink()
        path.write_bytes(full[: len(full) // 2])
    elif kind == "bomb header":
        write_bomb_png(path)
    elif kind == "empty file":
        path.write_bytes(b"")
    elif kind == "text named as an image":
        path.write_text("not an image at all\n")
    elif kind == "png named .jpg":  # the extension lies, the content is a fine image
        Image.fromarray(styled_pixels(0, rng)).save(path, format="PNG")
    elif kind.startswith("mode "):  # odd modes that convert to RGB
        Image.fromarray(styled_pixels(1, rng)).convert(kind.removeprefix("mode ")).save(path, format="TIFF")
    else:
        raise ValueError(kind)
    return path


UNREADABLE_KINDS = ("random bytes", "truncated jpeg", "bomb header", "empty file", "text named as an image")
HOSTILE_KINDS = (*UNREADABLE_KINDS, "png named .jpg", "mode L", "mode I;16", "mode CMYK", "mode 1", "mode LA", "mode P")
