"""Checks on the real dataset and weights; CI sets CLOTHING_DATA_DIR and CLOTHING_BACKBONE_WEIGHTS."""

import pytest
import torch
from click.testing import CliRunner
from real_data import real_data, requires_real_data
from torch import nn

from clothing.__main__ import cli as clothing_cli
from clothing.data import ClothingDataset, build_transforms
from clothing.features import cached_features
from clothing.model import build_head, load_backbone
from clothing.train import FeatureBatches, set_seed, train_and_evaluate

pytestmark = [pytest.mark.integration, pytest.mark.slow, requires_real_data]
EPOCHS = 8


def test_a_head_on_a_sixth_of_the_real_features_reaches_075_val_accuracy(tmp_path):
    """On a sixth of train/ (every sixth image, 512), so the suite extracts no full data set (all of it
    gave 0.80 in 3 epochs; a sixth measured 0.78 after 8 here)."""
    data, weights = real_data()
    backbone = load_backbone(weights)
    train_set = ClothingDataset(data / "train", build_transforms())
    train_set.image_paths, train_set.labels = train_set.image_paths[::6], train_set.labels[::6]
    val_set = ClothingDataset(data / "validation", build_transforms(), class_to_idx=train_set.class_to_idx)
    train = cached_features(train_set, backbone, tmp_path, progress=False)
    val = cached_features(val_set, backbone, tmp_path, progress=False)
    set_seed(42)
    head = build_head(len(train_set.classes), size_inner=100)
    history = train_and_evaluate(
        head,
        torch.optim.Adam(head.parameters(), lr=1e-3),
        FeatureBatches(train.plain, train.labels, 32, shuffle=True, generator=torch.Generator().manual_seed(42)),
        FeatureBatches(val.plain, val.labels, 256),
        nn.CrossEntropyLoss(),
        EPOCHS,
        "cpu",
    )
    print(f"val_acc after {EPOCHS} epochs: {history[-1]['val_acc']:.3f}")
    assert history[-1]["val_acc"] >= 0.75


def test_classify_finds_a_clothing_class_for_a_t_shirt():
    data, weights = real_data()
    shirt = sorted((data / "train" / "t-shirt").iterdir())[0]
    result = CliRunner().invoke(clothing_cli, ["classify", str(shirt), "--backbone-weights", str(weights)])
    assert result.exit_code == 0, result.output
    top5 = [line.split(maxsplit=1)[1] for line in result.output.splitlines()[1:]]
    assert len(top5) == 5
    assert {"jersey", "sweatshirt", "cardigan", "pajama", "poncho"} & set(top5), top5
