"""Stage 2's trial: fine-tune a stage-1 trial's last K inverted-residual blocks, on cached activations.

The course's recipe: first train the head on the frozen base, then unfreeze the top of the base and go
on with a small learning rate. The source trial's head is the starting point; the blocks after the cut
(and their BatchNorm layers) train with it, on the activations cached at the cut, one view per image per
epoch, so the frozen part of the trunk never runs again.

Stage 2 runs through the same trial machinery as stage 1 (sweep.trial), in a study of its own, so the
stage-1 sampler never sees it; its params are what it trained with (see space.suggest_finetune).
The activations are cached once, at the deepest cut the run may train from; a trial that trains
fewer blocks runs the frozen blocks in between forward once, in memory (FeatureSet.activations_at).

On hardware with native bf16 (AMX, AVX-512 bf16, a bf16 GPU) the blocks train under bf16 autocast
with fp32 master weights (`--finetune-precision auto`), and `--finetune-patience` ends a trial whose
val_acc has stalled; both are params of the trial.

Two stabilisers, each a recipe setting chosen by `make bench-accuracy`'s held-out estimate
(docs/benchmarks.md, "Accuracy"): `average="ema"` validates and keeps an exponential moving average of the weights,
`schedule="cosine"` anneals the lr to 0 over the trial's steps.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, replace

import optuna
import torch
from torch import nn

from clothing.checkpoint import spec_of
from clothing.model import ModelSpec, build_model, head_only, load_backbone, trainable_parameters
from clothing.train import EarlyStopping, FeatureBatches, TrainHooks, WeightAverage, set_seed, train_and_evaluate
from sweep.config import EMA_DECAY, FinetuneConfig
from sweep.objective import EVAL_BATCH
from sweep.select import FINETUNE_STAGE, TrialRecord
from sweep.session import Session
from sweep.space import suggest_finetune
from sweep.trial import BestEpoch, EpochCallback, trial_checkpoint

# A stage-2 trial's `train_precision` param -> the loop's autocast dtype (None: plain fp32).
AUTOCAST = {"fp32": None, "bf16": torch.bfloat16}


def layer_decayed_groups(tail: nn.Sequential, lr: float, decay: float) -> list[dict]:
    """The optimizer's parameter groups for a model's tail (ClothingClassifierMobileNet.tail()): the
    head and the trunk's final 1x1 conv at `lr`, the block below it at `lr * decay`, the next at
    `lr * decay**2`, and so on down to the cut, as timm's `layer_decay` and fastai's discriminative
    learning rates do: the earlier a block, the more general its features, the less it should move."""
    groups = [{"params": trainable_parameters(tail.head), "lr": lr}]
    for depth, layer in enumerate(reversed(tail.blocks)):  # depth 0: the final conv
        groups.append({"params": trainable_parameters(layer), "lr": lr * decay**depth})
    return groups


class FinetuneTrial:
    """The source trial's head plus the trunk's last blocks, trained on the activations at the cut."""

    stage = FINETUNE_STAGE

    def __init__(self, session: Session, source: TrialRecord, source_head: dict) -> None:
        self.session, self.source, self.source_head = session, source, source_head

    def suggest(self, trial: optuna.Trial) -> FinetuneConfig:
        config = suggest_finetune(trial, self.session.cfg)
        # The head and the cached activations were prepared for one source and at most so many blocks.
        if config.source_trial != self.source.number or not 1 <= config.blocks <= self.session.cfg.finetune_blocks:
            raise RuntimeError(
                f"stage 2 drew source trial {config.source_trial} with {config.blocks} block(s), but the run "
                f"prepared {self.source.name} with at most {self.session.cfg.finetune_blocks}"
            )
        return config

    def spec(self, config: FinetuneConfig) -> ModelSpec:
        return replace(spec_of(self.source_head), finetune_blocks=config.blocks)

    def params(self, config: FinetuneConfig) -> dict:
        return {
            **asdict(config.train),
            "source_trial": config.source_trial,
            "finetune_blocks": config.blocks,
            "average": config.average,
            "schedule": config.schedule,
            "train_precision": config.train_precision,
            "patience": config.patience,
            "lr_decay": config.lr_decay,
            "views": self.session.data.train.views,
            "image_size": self.session.data.image_size,
            "backbone": self.session.data.backbone_id,
        }

    def train(self, config: FinetuneConfig, on_epoch: EpochCallback) -> None:
        session, source, cfg = self.session, self.source_head, config.train
        set_seed(cfg.seed)
        model = build_model(self.spec(config), load_backbone(session.cfg.backbone_weights))
        head_only(model.head).load_state_dict(source["state_dict"])  # the source trial's trained head
        # Channels-last weights and batches: bench/ measured a 3-block training step 1.25x and an
        # evaluation batch 1.7x faster on a 2-core CPU than in the default layout.
        tail = model.tail().to(memory_format=torch.channels_last)
        groups = layer_decayed_groups(tail, cfg.lr, config.lr_decay)
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
        generator = torch.Generator().manual_seed(cfg.seed)
        activations = session.data.train.activations_at(model.cut, model.features)
        labels = session.data.train.labels.to(session.device)
        batches = functools.partial(FeatureBatches, channels_last=True)
        train_batches = batches(activations.to(session.device), labels, cfg.batch_size, True, generator, views=True)
        # The honest train_acc: the plain view of each training image, in eval mode.
        train_eval = batches(activations[:, 0].to(session.device), labels, EVAL_BATCH // 4)
        val_x = session.data.val.activations_at(model.cut, model.features, view=0).to(session.device)
        val_batches = batches(val_x, session.data.val.labels.to(session.device), EVAL_BATCH // 4)
        criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        steps = []  # what runs after every optimizer step
        if config.schedule == "cosine":
            schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs * len(train_batches))
            steps.append(schedule.step)
        average = WeightAverage(tail, EMA_DECAY) if config.average == "ema" else None
        if average is not None:
            steps.append(average.update)

        def after_step() -> None:
            for step in steps:
                step()

        hooks = TrainHooks(
            on_epoch,
            after_step=after_step if steps else None,
            evaluated=average.averaged if average is not None else None,
            early_stop=EarlyStopping(config.patience),
        )
        train_and_evaluate(
            tail,
            optimizer,
            train_batches,
            val_batches,
            criterion,
            cfg.epochs,
            session.device,
            hooks,
            train_eval_loader=train_eval,
            autocast=AUTOCAST[config.train_precision],
        )

    def checkpoint(self, config: FinetuneConfig, best: BestEpoch, **provenance) -> dict:
        return trial_checkpoint(
            self.session.data, config.train, best, config.blocks, source_trial=config.source_trial, **provenance
        )
