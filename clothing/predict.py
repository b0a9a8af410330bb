"""Top-k prediction, for the pretrained ImageNet model and for an exported clothing model."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from torchvision import models

from clothing.data import DatasetError, build_imagenet_transforms, load_image, shown

Prediction = list[tuple[str, float]]


def imagenet_categories() -> list[str]:
    """ImageNet class names from torchvision's own metadata (no download)."""
    return list(models.MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"])


def read_images(paths: Sequence[str | Path]) -> tuple[list[tuple[str, Image.Image]], list[str]]:
    """(path, image) for every file that decodes, and one message for each that does not, so one bad
    file among many costs only its own prediction."""
    readable, unreadable = [], []
    for path in paths:
        try:
            readable.append((str(path), load_image(path)))
        except DatasetError as exc:
            unreadable.append(str(exc))
    return readable, unreadable


def top_k(
    model: nn.Module,
    images: Sequence[Image.Image],
    transform: Callable,
    classes: Sequence[str],
    k: int = 3,
    tta: bool = False,
) -> list[Prediction]:
    """For each image, the k most likely (class, probability) pairs, most likely first.

    `tta` averages the logits of each image and its mirror image."""
    if not images:
        return []
    batch = torch.stack([transform(image) for image in images])
    model.eval()
    with torch.inference_mode():
        probs = torch.softmax(mirror_averaged_logits(model, batch) if tta else model(batch), dim=1)
    return ranked(probs, classes, k)


def ranked(probs: torch.Tensor, classes: Sequence[str], k: int) -> list[Prediction]:
    """Each row of class probabilities (N, C) as its k most likely (class, probability) pairs."""
    values, indices = probs.topk(min(k, len(classes)), dim=1)
    return [
        [(classes[i], float(v)) for v, i in zip(row_v.tolist(), row_i.tolist())]
        for row_v, row_i in zip(values, indices)
    ]


def prediction_lines(paths: Sequence[str], predictions: Sequence[Prediction]) -> list[str]:
    """What `predict` and `classify` print: each path, then its classes with their probabilities."""
    lines = []
    for path, preds in zip(paths, predictions):
        lines.append(shown(path))
        lines.extend(f"  {prob:6.3f}  {shown(name)}" for name, prob in preds)
    return lines


def unreadable_summary(messages: Sequence[str], total: int) -> str:
    """One line for the images that could not be read (the others were predicted)."""
    if len(messages) == 1:
        return messages[0]
    return f"{len(messages)} of {total} images could not be read: " + " | ".join(messages)


def mirror_averaged_logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Test-time augmentation: the mean of the logits of the images and of their mirror images."""
    return (model(images) + model(images.flip(-1))) / 2


def classify_imagenet(model: nn.Module, images: Sequence[Image.Image], k: int = 5) -> list[Prediction]:
    """The notebook's first step: a pretrained MobileNetV2's top-k ImageNet classes."""
    return top_k(model, images, build_imagenet_transforms(), imagenet_categories(), k)
