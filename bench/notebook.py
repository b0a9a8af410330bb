"""The course notebook's pipeline, kept as the baseline: PIL + Resize((224, 224)) + ToTensor +
Normalize, a DataLoader with batch 32 and no workers, and the eager backbone recomputed every time."""

from __future__ import annotations

import time

import torch
from torch import nn
from torch.utils.data import DataLoader

from clothing.data import ClothingDataset
from clothing.model import ClothingClassifierMobileNet, GlobalPool, trainable_parameters
from clothing.train import train_and_evaluate

BATCH_SIZE = 32


def notebook_features(dataset: ClothingDataset, backbone: nn.Module) -> torch.Tensor:
    """One pass of the frozen backbone over the images, as the notebook's evaluation does it."""
    extractor = nn.Sequential(backbone.features, GlobalPool()).eval()
    rows = []
    with torch.no_grad():
        for images, _ in DataLoader(dataset, batch_size=BATCH_SIZE):
            rows.append(extractor(images))
    return torch.cat(rows)


def notebook_pass(splits: dict[str, ClothingDataset], backbone: nn.Module) -> tuple[dict[str, torch.Tensor], float]:
    """A, the benches' budget: the notebook's one pass over each split; (the features by split, the
    seconds of all the passes)."""
    features, seconds = {}, 0.0
    for name, split in splits.items():
        start = time.perf_counter()
        features[name] = notebook_features(split, backbone)
        seconds += time.perf_counter() - start
    return features, seconds


def notebook_epoch(train: ClothingDataset, val: ClothingDataset, backbone: nn.Module) -> dict:
    """One epoch of the notebook's loop: images through the whole model, train then validation."""
    model = ClothingClassifierMobileNet(len(train.classes), size_inner=100, backbone=backbone)
    optimizer = torch.optim.Adam(trainable_parameters(model), lr=1e-3)
    loaders = DataLoader(train, batch_size=BATCH_SIZE, shuffle=True), DataLoader(val, batch_size=BATCH_SIZE)
    return train_and_evaluate(model, optimizer, *loaders, nn.CrossEntropyLoss(), 1, "cpu")[0]
