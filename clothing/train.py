"""The one training loop, `train_and_evaluate`, shared by the head-on-features path and the
full-model-on-images path, and `FeatureBatches`, the loader of the features path. The loop returns a
history and never prints or logs: side effects (tracking, checkpoints, pruning) belong to the
`on_epoch` callback."""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

EpochCallback = Callable[[int, dict, nn.Module], None]


class TrainingDiverged(FloatingPointError):
    """The loss became NaN or infinite; training stops at once rather than wasting epochs."""


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch so that a CPU run is repeatable."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _run_epoch(
    model: nn.Module,
    loader: Iterable,
    criterion: nn.Module,
    device: torch.device,
    optimizer: torch.optim.Optimizer | None,
    after_step: Callable[[], None] | None = None,
) -> tuple[float, float]:
    """One pass over `loader`; trains when an optimizer is given, calling `after_step` after each
    step. Returns (loss per sample, accuracy)."""
    total_loss, correct, seen = 0.0, 0, 0
    for inputs, labels in loader:
        inputs = inputs.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        if optimizer is not None:
            optimizer.zero_grad()
        outputs = model(inputs)
        loss = criterion(outputs, labels)
        batch_loss = loss.item()
        if not math.isfinite(batch_loss):
            raise TrainingDiverged(f"loss became {batch_loss} after {seen} samples")
        if optimizer is not None:
            loss.backward()
            optimizer.step()
            if after_step is not None:
                after_step()
        total_loss += batch_loss * labels.size(0)
        correct += (outputs.argmax(dim=1) == labels).sum().item()
        seen += labels.size(0)
    if seen == 0:
        raise ValueError("the data loader yielded no samples")
    return total_loss / seen, correct / seen


@dataclass
class TrainHooks:
    """What the loop calls besides its own work, as Lightning's callbacks do: `on_epoch(epoch, metrics,
    model)` after each epoch (it may raise to stop early, e.g. optuna.TrialPruned), `after_step()` after
    every optimizer step (a per-step lr schedule, a weight average), and `evaluated`, the model that is
    validated, scored and handed to `on_epoch` instead of the trained one (a weight average of it)."""

    on_epoch: EpochCallback | None = None
    after_step: Callable[[], None] | None = None
    evaluated: nn.Module | None = None


def train_and_evaluate(  # noqa: PLR0913 - the loop's own inputs (DESIGN.md's interface), hooks in one object
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train_loader: Iterable,
    val_loader: Iterable,
    criterion: nn.Module,
    num_epochs: int,
    device: torch.device | str,
    hooks: TrainHooks | EpochCallback | None = None,
    *,
    train_eval_loader: Iterable | None = None,
) -> list[dict]:
    """Train for `num_epochs`, validating after each; returns one metrics dict per epoch.

    Each dict has epoch (1-based), train_loss, train_acc, val_loss, val_acc, running_train_loss and
    running_train_acc; losses are averaged per sample. The running ones are measured while training
    (train mode: dropout on, over whatever augmentation `train_loader` gives). train_loss/train_acc
    are the honest ones when `train_eval_loader` (the plain training images) is given: the model in
    eval mode after the epoch, like validation, so train minus val is a real generalisation gap;
    without it they equal the running ones.
    `hooks` is a TrainHooks, or just its `on_epoch` callback; raises TrainingDiverged as soon as a
    loss is not finite.
    """
    hooks = hooks if isinstance(hooks, TrainHooks) else TrainHooks(on_epoch=hooks)
    device = torch.device(device)
    model.to(device)
    evaluated = model if hooks.evaluated is None else hooks.evaluated.to(device)
    history = []
    for epoch in range(1, num_epochs + 1):
        model.train()
        running_loss, running_acc = _run_epoch(model, train_loader, criterion, device, optimizer, hooks.after_step)
        evaluated.eval()
        with torch.no_grad():
            val_loss, val_acc = _run_epoch(evaluated, val_loader, criterion, device, None)
            if train_eval_loader is not None:
                train_loss, train_acc = _run_epoch(evaluated, train_eval_loader, criterion, device, None)
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
        if hooks.on_epoch is not None:
            hooks.on_epoch(epoch, metrics, evaluated)
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
        n = len(self.labels)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        if self.views:
            view = torch.randint(self.features.shape[1], (n,), generator=self.generator)
        for start in range(0, n, self.batch_size):
            if not self.shuffle and not self.views:  # plain slices: no copy
                batch = slice(start, start + self.batch_size)
                rows, labels = self.features[batch], self.labels[batch]
            else:
                idx = order[start : start + self.batch_size]
                rows, labels = self.features[idx, view[idx]] if self.views else self.features[idx], self.labels[idx]
            rows = rows.float()  # activations may be cached in fp16; training and evaluation run in fp32
            yield (rows.contiguous(memory_format=torch.channels_last) if self.channels_last else rows), labels


class WeightAverage:
    """An exponential moving average of a model's weights and BatchNorm statistics (EMA, as timm
    keeps one), updated after every optimizer step: `averaged` is the model to evaluate and keep.

    After n updates each weight is decay**n * its value at the start plus (1 - decay) * decay**(n-k)
    * its value after step k, summed over k; integer buffers (BatchNorm's batch counter) are copied.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"the average's decay must be in (0, 1), got {decay}")
        self.model, self.decay = model, decay
        self.averaged = copy.deepcopy(model).eval()
        for param in self.averaged.parameters():
            param.requires_grad_(False)

    @torch.no_grad()
    def update(self) -> None:
        current = self.model.state_dict()
        for name, average in self.averaged.state_dict().items():
            if average.is_floating_point():
                average.lerp_(current[name], 1 - self.decay)
            else:
                average.copy_(current[name])
