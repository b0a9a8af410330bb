"""Stage 2's trial: fine-tune a stage-1 trial's last K inverted-residual blocks, on cached activations.

The course's recipe: first train the head on the frozen base, then unfreeze the top of the base and go
on with a small learning rate. The source trial's head is the starting point; the blocks after the cut
(and their BatchNorm layers) train with it, on the activations cached at the cut, one view per image per
epoch, so the frozen part of the trunk never runs again.

Stage 2 runs through the same trial machinery as stage 1 (sweep.trial), in a study of its own, so the
stage-1 sampler never sees it; its params are what it trained with (see space.suggest_finetune).
"""

from __future__ import annotations

from dataclasses import asdict, replace

import optuna
import torch
from torch import nn

from clothing.checkpoint import spec_of
from clothing.model import ModelSpec, build_model, head_only, load_backbone, trainable_parameters
from clothing.train import FeatureBatches, set_seed, train_and_evaluate
from sweep.config import FinetuneConfig
from sweep.objective import EVAL_BATCH
from sweep.select import FINETUNE_STAGE, TrialRecord
from sweep.space import suggest_finetune
from sweep.trial import BestEpoch, EpochCallback, TrialContext, trial_checkpoint


class FinetuneTrial:
    """The source trial's head plus the trunk's last blocks, trained on the activations at the cut."""

    stage = FINETUNE_STAGE

    def __init__(self, ctx: TrialContext, source: TrialRecord, source_head: dict) -> None:
        self.ctx, self.source, self.source_head = ctx, source, source_head

    def suggest(self, trial: optuna.Trial) -> FinetuneConfig:
        config = suggest_finetune(trial, self.ctx.cfg)
        # The head and the cached activations were prepared for one source and one cut.
        if config.source_trial != self.source.number or config.blocks != self.ctx.cfg.finetune_blocks:
            raise RuntimeError(
                f"stage 2 drew source trial {config.source_trial} with {config.blocks} block(s), but the run "
                f"prepared {self.source.name} with {self.ctx.cfg.finetune_blocks}"
            )
        return config

    def spec(self, config: FinetuneConfig) -> ModelSpec:
        return replace(spec_of(self.source_head), finetune_blocks=config.blocks)

    def params(self, config: FinetuneConfig) -> dict:
        return {
            **asdict(config.train),
            "source_trial": config.source_trial,
            "finetune_blocks": config.blocks,
            "views": self.ctx.data.train.views,
            "backbone": self.ctx.data.backbone_id,
        }

    def train(self, config: FinetuneConfig, on_epoch: EpochCallback) -> None:
        ctx, source, cfg = self.ctx, self.source_head, config.train
        set_seed(cfg.seed)
        model = build_model(self.spec(config), load_backbone(ctx.cfg.backbone_weights))
        head_only(model.head).load_state_dict(source["state_dict"])  # the source trial's trained head
        tail = model.tail()
        optimizer = torch.optim.AdamW(trainable_parameters(tail), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
        generator = torch.Generator().manual_seed(cfg.seed)
        activations = ctx.data.train.activations()
        labels = ctx.data.train.labels.to(ctx.device)
        train_batches = FeatureBatches(
            activations.to(ctx.device), labels, cfg.batch_size, shuffle=True, generator=generator, views=True
        )
        # The honest train_acc: the plain view of each training image, in eval mode.
        train_eval = FeatureBatches(activations[:, 0].to(ctx.device), labels, EVAL_BATCH // 4)
        val_x, val_y = ctx.data.val.activations()[:, 0].to(ctx.device), ctx.data.val.labels.to(ctx.device)
        val_batches = FeatureBatches(val_x, val_y, EVAL_BATCH // 4)
        criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        train_and_evaluate(
            tail, optimizer, train_batches, val_batches, criterion, cfg.epochs, ctx.device, on_epoch, train_eval
        )

    def checkpoint(self, config: FinetuneConfig, best: BestEpoch, **provenance) -> dict:
        return trial_checkpoint(
            self.ctx.data, config.train, best, config.blocks, source_trial=config.source_trial, **provenance
        )
