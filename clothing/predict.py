"""Top-k prediction, for the pretrained ImageNet model and for an exported clothing model."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from torchvision import models

from clothing.data import build_imagenet_transforms, shown, try_image

Prediction = list[tuple[str, float]]


def imagenet_categories() -> list[str]:
    """ImageNet class names from torchvision's own metadata (no download)."""
    return list(models.MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"])


def read_images(paths: Sequence[str | Path]) -> tuple[list[tuple[str, Image.Image]], list[str]]:
    """(path, image) for every file that decodes, and one message for each that does not, so one bad
    file among many costs only its own prediction."""
    readable, unreadable = [], []
    for path in paths:
        image, error = try_image(path)
        if image is None:
            unreadable.append(str(error))
        else:
            readable.append((str(path), image))
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
        logits = mirror_tta(lambda mirrored: model(batch.flip(-1) if mirrored else batch)) if tta else model(batch)
        probs = torch.softmax(logits, dim=1)
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


def mirror_tta(logits_of: Callable[[bool], torch.Tensor]) -> torch.Tensor:
    """Test-time augmentation, the one place it is done: the mean of the logits of the images
    (`logits_of(False)`) and of their mirror images (`logits_of(True)`), however those are computed
    (a model on a batch, the trunk on decoded pixels, cached features of the mirror view)."""
    return (logits_of(False) + logits_of(True)) / 2


def classify_imagenet(model: nn.Module, images: Sequence[Image.Image], k: int = 5) -> list[Prediction]:
    """The notebook's first step: a pretrained MobileNetV2's top-k ImageNet classes."""
    return top_k(model, images, build_imagenet_transforms(), imagenet_categories(), k)
