"""The real dataset and weights, for the integration tests, when the environment names them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def real_data() -> tuple[Path, Path] | None:
    """The real dataset and weights, when CLOTHING_DATA_DIR and CLOTHING_BACKBONE_WEIGHTS name them."""
    data, weights = os.environ.get("CLOTHING_DATA_DIR"), os.environ.get("CLOTHING_BACKBONE_WEIGHTS")
    if data and weights and Path(data, "train").is_dir() and Path(weights).is_file():
        return Path(data), Path(weights)
    return None


requires_real_data = pytest.mark.skipif(
    real_data() is None, reason="set CLOTHING_DATA_DIR and CLOTHING_BACKBONE_WEIGHTS to the real dataset and weights"
)
