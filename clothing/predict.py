"""Top-k prediction, for the pretrained ImageNet model and for an exported clothing model."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn
from torchvision import models

from clothing.data import build_imagenet_transforms, load_image

Prediction = list[tuple[str, float]]


def imagenet_categories() -> list[str]:
    """ImageNet class names from torchvision's own metadata (no download)."""
    return list(models.MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"])


def top_k(
    model: nn.Module,
    paths: Sequence[str | Path],
    transform: Callable,
    classes: Sequence[str],
    k: int = 3,
    tta: bool = False,
) -> list[Prediction]:
    """For each image, the k most likely (class, probability) pairs, most likely first.

    `tta` averages the logits of each image and its mirror image."""
    batch = torch.stack([transform(load_image(p)) for p in paths])
    model.eval()
    with torch.inference_mode():
        probs = torch.softmax(mirror_averaged_logits(model, batch) if tta else model(batch), dim=1)
    values, indices = probs.topk(min(k, len(classes)), dim=1)
    return [
        [(classes[i], float(v)) for v, i in zip(row_v.tolist(), row_i.tolist())]
        for row_v, row_i in zip(values, indices)
    ]


def mirror_averaged_logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Test-time augmentation: the mean of the logits of the images and of their mirror images."""
    return (model(images) + model(images.flip(-1))) / 2


def classify_imagenet(model: nn.Module, paths: Sequence[str | Path], k: int = 5) -> list[Prediction]:
    """The notebook's first step: a pretrained MobileNetV2's top-k ImageNet classes."""
    return top_k(model, paths, build_imagenet_transforms(), imagenet_categories(), k)
