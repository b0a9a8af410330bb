"""The search spaces of both stages: the only place that calls trial.suggest_*."""

from __future__ import annotations

import optuna

from clothing.model import MAX_FINETUNE_BLOCKS
from sweep.config import FinetuneConfig, SweepConfig, TrainConfig
from sweep.select import TrialRecord

LR_RANGE = (1e-4, 1e-1)
SIZE_INNER_CHOICES = (10, 100, 1000)  # the seed's grid; 0 (no inner layer) can be added here
# Opt-in dimensions (`run --search NAME`); off, each keeps the value that changes nothing.
OPTIONAL_DIMENSIONS = ("dropout", "weight_decay", "label_smoothing")
DROPOUT_CHOICES = (0.0, 0.2, 0.5)
WEIGHT_DECAY_RANGE = (1e-6, 1e-2)
LABEL_SMOOTHING_CHOICES = (0.0, 0.1, 0.2)

# Stage 2's dimensions. A fixed recipe (the default) pins every one of them with Optuna's
# PartialFixedSampler, so its trial's params are exactly what it trained with; the ranges are what
# the values may be, and what a stage-2 search would sample from.
FINETUNE_LR_RANGE = (1e-7, 1e-2)
MAX_EPOCHS = 1000
MAX_TRIAL_NUMBER = 2**31 - 1


def _suggest_head(trial: optuna.Trial, search: tuple[str, ...]) -> dict:
    """The head's shape and regularisation: shared by both stages (stage 2 pins its source's)."""
    return {
        "size_inner": trial.suggest_categorical("size_inner", SIZE_INNER_CHOICES),
        "dropout": trial.suggest_categorical("dropout", DROPOUT_CHOICES) if "dropout" in search else 0.0,
        "weight_decay": (
            trial.suggest_float("weight_decay", *WEIGHT_DECAY_RANGE, log=True) if "weight_decay" in search else 0.0
        ),
        "label_smoothing": (
            trial.suggest_categorical("label_smoothing", LABEL_SMOOTHING_CHOICES)
            if "label_smoothing" in search
            else 0.0
        ),
    }


def suggest(trial: optuna.Trial, sweep: SweepConfig) -> TrainConfig:
    """Sample one stage-1 trial's configuration; fixed settings come from the sweep."""
    lr = trial.suggest_float("lr", *LR_RANGE, log=True)
    return TrainConfig(
        lr=lr, **_suggest_head(trial, sweep.search), epochs=sweep.epochs, batch_size=sweep.batch_size, seed=sweep.seed
    )


def suggest_finetune(trial: optuna.Trial, sweep: SweepConfig) -> FinetuneConfig:
    """One stage-2 trial's configuration: its own lr, blocks and epochs on top of its source's head."""
    source = trial.suggest_int("source_trial", 0, MAX_TRIAL_NUMBER)
    blocks = trial.suggest_int("finetune_blocks", 1, MAX_FINETUNE_BLOCKS)
    lr = trial.suggest_float("lr", *FINETUNE_LR_RANGE, log=True)
    epochs = trial.suggest_int("epochs", 1, MAX_EPOCHS)
    head = _suggest_head(trial, sweep.search)
    train = TrainConfig(lr=lr, **head, epochs=epochs, batch_size=sweep.batch_size, seed=sweep.seed)
    return FinetuneConfig(source_trial=source, blocks=blocks, train=train)


def finetune_recipe(sweep: SweepConfig, source: TrialRecord) -> dict:
    """The values a fixed stage-2 recipe pins: the source trial's head configuration (all of its
    params but its lr) and the sweep's stage-2 settings."""
    head = {k: v for k, v in source.params.items() if k != "lr"}
    return {
        **head,
        "source_trial": source.number,
        "finetune_blocks": sweep.finetune_blocks,
        "lr": sweep.finetune_lr,
        "epochs": sweep.finetune_epochs,
    }


def describe_space(sweep: SweepConfig) -> dict:
    """Stage 1's space in words, for the study's user attrs (what optuna-dashboard shows)."""
    search = set(sweep.search)
    head = {
        "lr": f"log-uniform {LR_RANGE}",
        "size_inner": f"one of {SIZE_INNER_CHOICES}",
        "dropout": f"one of {DROPOUT_CHOICES}" if "dropout" in search else "0 (not searched)",
        "weight_decay": f"log-uniform {WEIGHT_DECAY_RANGE}" if "weight_decay" in search else "0 (not searched)",
        "label_smoothing": f"one of {LABEL_SMOOTHING_CHOICES}" if "label_smoothing" in search else "0 (not searched)",
    }
    fixed = {
        "epochs": sweep.epochs,
        "batch_size": sweep.batch_size,
        "views": sweep.views,
    }
    return {"stage1": {"searched": head, "fixed": fixed}}


def describe_finetune_space(sweep: SweepConfig) -> dict:
    """Stage 2's recipe in words, for the stage-2 study's user attrs."""
    return {
        "source_trial": "the stage-1 winner",
        "size_inner, dropout, ...": "the source trial's",
        "finetune_blocks": sweep.finetune_blocks,
        "lr": sweep.finetune_lr,
        "epochs": sweep.finetune_epochs,
    }
