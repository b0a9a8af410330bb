"""Shared fixtures: tiny generated image folders, a random backbone, real stores in tmp_path."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import models

CLASSES = ("hat", "pants", "shoes")
# Each class gets its own base colour, so a head can separate them even on a random backbone.
BASE_COLOURS = {"hat": (200, 40, 40), "pants": (40, 200, 40), "shoes": (40, 40, 200), "socks": (200, 200, 40)}


def write_image(path: Path, colour=(128, 128, 128), seed: int = 0, size: int = 40, mode: str = "RGB") -> Path:
    """A small noisy image of one colour; the format follows the file's extension."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour) + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).convert(mode).save(path)
    return path


def make_split(root: Path, classes=CLASSES, per_class: int = 4, seed: int = 0) -> Path:
    for c, name in enumerate(classes):
        for i in range(per_class):
            write_image(root / name / f"{i:02d}.jpg", BASE_COLOURS[name], seed=seed + 100 * c + i)
    return root


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """train/ with 4 images per class and validation/ with 2, three classes."""
    root = tmp_path / "data"
    make_split(root / "train", per_class=4)
    make_split(root / "validation", per_class=2, seed=1000)
    return root


@pytest.fixture(scope="session")
def random_weights(tmp_path_factory) -> Path:
    """A randomly initialised MobileNetV2 saved as a state_dict, standing in for ImageNet weights."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "mobilenet_v2_random.pth"
    torch.save(models.mobilenet_v2(weights=None).state_dict(), path)
    return path


@pytest.fixture
def stores(tmp_path: Path) -> dict[str, str]:
    """CLI options that put every piece of run state (Optuna, MLflow, cache) in tmp_path."""
    return {
        "--storage": f"sqlite:///{tmp_path / 'runs' / 'optuna.db'}",
        "--tracking-uri": f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}",
        "--cache-dir": str(tmp_path / "runs" / "cache"),
    }


def real_data() -> tuple[Path, Path] | None:
    """The real dataset and weights, when CLOTHING_DATA_DIR and CLOTHING_BACKBONE_WEIGHTS name them."""
    data, weights = os.environ.get("CLOTHING_DATA_DIR"), os.environ.get("CLOTHING_BACKBONE_WEIGHTS")
    if data and weights and Path(data, "train").is_dir() and Path(weights).is_file():
        return Path(data), Path(weights)
    return None


requires_real_data = pytest.mark.skipif(
    real_data() is None, reason="set CLOTHING_DATA_DIR and CLOTHING_BACKBONE_WEIGHTS to the real dataset and weights"
)
