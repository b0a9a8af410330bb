"""The one training loop, `train_and_evaluate`, shared by the head-on-features path and the
full-model-on-images path, and `FeatureBatches`, the loader of the features path. The loop returns a
history and never prints or logs: side effects (tracking, checkpoints, pruning) belong to the
`on_epoch` callback."""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import nn

EpochCallback = Callable[[int, dict, nn.Module], None]
GATHER_BATCHES = 64  # FeatureBatches copies the rows of this many shuffled batches at once


class TrainingDiverged(FloatingPointError):
    """The loss became NaN or infinite; training stops at once rather than wasting epochs."""


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch so that a CPU run is repeatable."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _run_epoch(  # noqa: PLR0913 - the loop's pass, with its autocast
    model: nn.Module,
    loader: Iterable,
    criterion: nn.Module,
    device: torch.device,
    optimizer: torch.optim.Optimizer | None,
    autocast: torch.dtype | None = None,
) -> tuple[float, float]:
    """One pass over `loader`; trains when an optimizer is given. Returns (loss per sample, accuracy)."""
    total_loss, correct, seen = 0.0, 0, 0
    for inputs, labels in loader:
        inputs = inputs.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        if optimizer is not None:
            optimizer.zero_grad()
        with torch.autocast(device.type, dtype=autocast) if autocast is not None else contextlib.nullcontext():
            outputs = model(inputs).float()  # the loss, its gradient's start and the argmax in fp32
        loss = criterion(outputs, labels)
        batch_loss = loss.item()
        if not math.isfinite(batch_loss):
            raise TrainingDiverged(f"loss became {batch_loss} after {seen} samples")
        if optimizer is not None:
            loss.backward()
            optimizer.step()
        total_loss += batch_loss * labels.size(0)
        correct += (outputs.argmax(dim=1) == labels).sum().item()
        seen += labels.size(0)
    if seen == 0:
        raise ValueError("the data loader yielded no samples")
    return total_loss / seen, correct / seen


class EarlyStopping:
    """Stop once val_acc has not beaten its best for `patience` epochs in a row, as Keras's and
    Lightning's EarlyStopping do ("beaten": strictly higher, the rule that picks the checkpointed
    epoch, so the stop never loses the checkpoint's epoch). `patience` 0 never stops."""

    def __init__(self, patience: int) -> None:
        if patience < 0:
            raise ValueError(f"patience must be 0 (off) or more, got {patience}")
        self.patience, self.best, self.stale = patience, -math.inf, 0

    def __call__(self, metrics: dict) -> bool:
        if metrics["val_acc"] > self.best:
            self.best, self.stale = metrics["val_acc"], 0
        else:
            self.stale += 1
        return self.patience > 0 and self.stale >= self.patience


def train_and_evaluate(  # noqa: PLR0913 - the loop's own inputs (DESIGN.md's interface)
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train_loader: Iterable,
    val_loader: Iterable,
    criterion: nn.Module,
    num_epochs: int,
    device: torch.device | str,
    on_epoch: EpochCallback | None = None,
    *,
    train_eval_loader: Iterable | None = None,
    autocast: torch.dtype | None = None,
    early_stop: Callable[[dict], bool] | None = None,
) -> list[dict]:
    """Train for `num_epochs`, validating after each; returns one metrics dict per epoch.

    Each dict has epoch (1-based), train_loss, train_acc, val_loss, val_acc, running_train_loss and
    running_train_acc; losses are averaged per sample. The running ones are measured while training
    (train mode: dropout on, over whatever augmentation `train_loader` gives). train_loss/train_acc
    are the honest ones when `train_eval_loader` (the plain training images) is given: the model in
    eval mode after the epoch, like validation, so train minus val is a real generalisation gap;
    without it they equal the running ones.
    `on_epoch(epoch, metrics, model)` runs after each epoch (it may raise to stop early, e.g.
    optuna.TrialPruned), then `early_stop(metrics)` says whether to end the run there (EarlyStopping);
    raises TrainingDiverged as soon as a loss is not finite. `autocast` (torch.bfloat16) runs the
    training passes under autocast to that dtype: the weights, their gradients and the optimizer's
    state stay fp32 (mixed precision; no loss scaling, which bf16's fp32-sized exponent does not
    need). Validation and the honest train pass run in fp32, as the exported model predicts, so the
    val_acc the winner rule compares is the shipped model's on every CPU.
    """
    device = torch.device(device)
    model.to(device)
    history = []
    for epoch in range(1, num_epochs + 1):
        model.train()
        running_loss, running_acc = _run_epoch(model, train_loader, criterion, device, optimizer, autocast)
        model.eval()
        with torch.no_grad():  # in fp32 whatever the training's autocast: as an exported model predicts
            val_loss, val_acc = _run_epoch(model, val_loader, criterion, device, None)
            if train_eval_loader is not None:
                train_loss, train_acc = _run_epoch(model, train_eval_loader, criterion, device, None)
            else:
                train_loss, train_acc = running_loss, running_acc
        metrics = {
            "epoch": epoch,
            "train_loss": train_loss,
            "train_acc": train_acc,
            "val_loss": val_loss,
            "val_acc": val_acc,
            "running_train_loss": running_loss,
            "running_train_acc": running_acc,
        }
        history.append(metrics)
        if on_epoch is not None:
            on_epoch(epoch, metrics, model)
        if early_stop is not None and early_stop(metrics):
            break
    return history


class FeatureBatches:
    """Mini-batches of in-memory (features, labels), reshuffled every epoch.

    Same order as a DataLoader with `shuffle=True, generator=generator` (both draw one randperm per
    epoch), but it slices whole tensors instead of collating samples one by one, which matters when
    a batch of the head costs less than the collation. With `views=True` the features are
    (N, V, ...) and every epoch draws one view per sample (after the shuffle, from the same generator).
    `channels_last=True` hands out activation batches (B, C, H, W) in channels-last memory, the layout
    oneDNN's convolutions run fastest in on a CPU (with the model in it too).
    """

    def __init__(  # noqa: PLR0913 - a DataLoader's own arguments
        self,
        features: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        views: bool = False,
        channels_last: bool = False,
    ) -> None:
        if views and features.shape[1] == 1:  # one view: nothing to draw, same batches as plain rows
            features, views = features[:, 0], False
        self.features, self.labels = features, labels
        self.batch_size, self.shuffle, self.generator, self.views = batch_size, shuffle, generator, views
        self.channels_last = channels_last

    def __len__(self) -> int:
        return -(-len(self.labels) // self.batch_size)

    def __iter__(self):
        for rows, labels in self._chunks():
            for first in range(0, len(labels), self.batch_size):
                batch = rows[first : first + self.batch_size].float()  # activations may be cached in fp16
                if self.channels_last:
                    batch = batch.contiguous(memory_format=torch.channels_last)
                yield batch, labels[first : first + self.batch_size]

    def _chunks(self):
        """(rows, labels) in the epoch's order, a chunk at a time: the whole tensors when nothing is
        drawn (slices then copy nothing), else one gather per GATHER_BATCHES batches: a few large
        copies instead of one small indexed copy per batch, with the same rows in the same order."""
        n = len(self.labels)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        view = torch.randint(self.features.shape[1], (n,), generator=self.generator) if self.views else None
        if view is None and not self.shuffle:
            yield self.features, self.labels
            return
        step = self.batch_size * GATHER_BATCHES
        for start in range(0, n, step):
            idx = order[start : start + step]
            yield self._rows(idx, view), self.labels[idx]

    def _rows(self, idx: torch.Tensor, view: torch.Tensor | None) -> torch.Tensor:
        return self.features[idx, view[idx]] if view is not None else self.features[idx]
