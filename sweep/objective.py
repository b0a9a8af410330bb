"""Stage 1's trial: suggest -> train a head on the cached features -> best validation accuracy."""

from __future__ import annotations

from dataclasses import asdict

import optuna
import torch
from torch import nn

from clothing.model import ModelSpec, build_head, head_only, trainable_parameters
from clothing.train import FeatureBatches, set_seed, train_and_evaluate
from sweep.config import TrainConfig
from sweep.select import HEAD_STAGE
from sweep.session import Session
from sweep.space import suggest
from sweep.trial import BestEpoch, EpochCallback, trial_checkpoint

EVAL_BATCH = 1024  # evaluation has no gradients: large batches only save Python overhead


class HeadTrial:
    """A head on the frozen backbone's cached features."""

    stage = HEAD_STAGE

    def __init__(self, session: Session) -> None:
        self.session = session
        data, device = session.data, session.device
        # Features move to the device once; every trial and epoch reuses them. Training draws one of
        # the cached views of each image per epoch; validation, and the honest train_acc, see the
        # plain images.
        self.train_xy = (data.train.features.to(device), data.train.labels.to(device))
        self.train_plain = data.train.plain.to(device)
        self.val_xy = (data.val.plain.to(device), data.val.labels.to(device))

    def suggest(self, trial: optuna.Trial) -> TrainConfig:
        return suggest(trial, self.session.cfg)

    def spec(self, config: TrainConfig) -> ModelSpec:
        data = self.session.data
        return ModelSpec(tuple(data.classes), config.size_inner, config.dropout, image_size=data.image_size)

    def params(self, config: TrainConfig) -> dict:
        return {
            **asdict(config),
            "image_size": self.session.data.image_size,
            "backbone": self.session.data.backbone_id,
            "precision": self.session.cfg.precision,
            "engine": self.session.data.train.engine,
            "num_train": len(self.train_xy[1]),
            "views": self.session.data.train.views,
        }

    def train(self, config: TrainConfig, on_epoch: EpochCallback) -> None:
        classes = len(self.session.data.classes)
        train_head(config, classes, self.train_xy, self.train_plain, self.val_xy, self.session.device, on_epoch)

    def checkpoint(self, config: TrainConfig, best: BestEpoch, **provenance) -> dict:
        return trial_checkpoint(self.session.data, config, best, **provenance)


def train_head(  # noqa: PLR0913 - the trial's data, device and callback
    config: TrainConfig,
    num_classes: int,
    train_xy: tuple[torch.Tensor, torch.Tensor],
    train_plain: torch.Tensor,
    val_xy: tuple[torch.Tensor, torch.Tensor],
    device: torch.device,
    on_epoch: EpochCallback | None = None,
) -> list[dict]:
    """One stage-1 trial's training: a head on cached features (`train_xy` with every view, the plain
    training rows for the honest train_acc, the validation rows), as `bench` times it too."""
    set_seed(config.seed)
    # Named as in the full model's tail, so the checkpoint's keys are the same for both stages.
    head = head_only(build_head(num_classes, config.size_inner, config.dropout)).to(device)
    # AdamW with weight_decay=0 is exactly Adam; with decay it is the decoupled form that works.
    # fused=True: one kernel per step instead of several passes over the weights, which halves a
    # size_inner=1000 epoch on a small CPU (bench/ measured 0.67 s against 1.30 s).
    optimizer = torch.optim.AdamW(
        trainable_parameters(head), lr=config.lr, weight_decay=config.weight_decay, fused=True
    )
    generator = torch.Generator().manual_seed(config.seed)
    train_batches = FeatureBatches(*train_xy, config.batch_size, shuffle=True, generator=generator, views=True)
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    return train_and_evaluate(
        head,
        optimizer,
        train_batches,
        FeatureBatches(*val_xy, EVAL_BATCH),
        criterion,
        config.epochs,
        device,
        on_epoch,
        train_eval_loader=FeatureBatches(train_plain, train_xy[1], EVAL_BATCH),
    )
