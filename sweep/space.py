"""The search spaces of both stages: the only place that calls trial.suggest_*."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import optuna

from clothing.data import IMAGE_SIZE
from clothing.model import MAX_FINETUNE_BLOCKS
from sweep.config import (
    AVERAGES,
    FINETUNE_LR_RANGE,
    FINETUNE_SEARCH_LR,
    MAX_EPOCHS,
    MAX_LABEL_SMOOTHING,
    OPTIONAL_DIMENSIONS,
    SCHEDULES,
    TRAINING_PRECISIONS,
    FinetuneConfig,
    SweepConfig,
    TrainConfig,
)
from sweep.select import TrialRecord

LR_RANGE = (1e-4, 1e-1)
SIZE_INNER_CHOICES = (10, 100, 1000)  # the seed's grid; 0 (no inner layer) can be added here
# Opt-in dimensions (`run --search NAME`, config.OPTIONAL_DIMENSIONS); off, each keeps the value that
# changes nothing.
DROPOUT_CHOICES = (0.0, 0.2, 0.5)
WEIGHT_DECAY_RANGE = (1e-6, 1e-2)
LABEL_SMOOTHING_CHOICES = (0.0, 0.1, 0.2)

# Stage 2's dimensions. A fixed recipe (the default) pins every one of them with Optuna's
# PartialFixedSampler, so its trial's params are exactly what it trained with; the ranges
# (config.FINETUNE_LR_RANGE, ...) are what the values may be, and what a stage-2 search samples from.
MAX_TRIAL_NUMBER = 2**31 - 1


@dataclass(frozen=True)
class Dimension:
    """One searched parameter: `kind` float, log-float, int or categorical, over [low, high] or `choices`."""

    name: str
    kind: str
    low: float | None = None
    high: float | None = None
    choices: tuple = ()

    def suggest(self, trial: optuna.Trial):
        if self.kind == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high))
        return trial.suggest_float(self.name, self.low, self.high, log=self.kind == "log-float")

    def describe(self) -> str:
        if self.kind == "categorical":
            return f"one of {tuple(self.choices)}"
        return f"{'log-uniform' if self.kind == 'log-float' else self.kind} ({self.low:g}, {self.high:g})"

    def as_dict(self) -> dict:
        spec = {"type": self.kind}
        return (
            {**spec, "choices": list(self.choices)}
            if self.kind == "categorical"
            else {**spec, "low": self.low, "high": self.high}
        )


# The default space: the seed's two dimensions, and each opt-in one's grid (`--search NAME`).
DEFAULT_DIMENSIONS = {
    "lr": Dimension("lr", "log-float", *LR_RANGE),
    "size_inner": Dimension("size_inner", "categorical", choices=SIZE_INNER_CHOICES),
    "dropout": Dimension("dropout", "categorical", choices=DROPOUT_CHOICES),
    "weight_decay": Dimension("weight_decay", "log-float", *WEIGHT_DECAY_RANGE),
    "label_smoothing": Dimension("label_smoothing", "categorical", choices=LABEL_SMOOTHING_CHOICES),
}
ALWAYS_SEARCHED = ("lr", "size_inner")


@functools.cache  # a config's space has one answer: resolved once, read by every trial
def resolved_space(sweep: SweepConfig) -> dict[str, Dimension]:
    """Stage 1's space: lr and size_inner, the `--search` dimensions with their default grids, and a
    sweep file's dimensions over either (a dimension in the file is searched). Read it, never change it."""
    names = [*ALWAYS_SEARCHED, *sweep.search, *(d.name for d in sweep.space)]
    space = {name: DEFAULT_DIMENSIONS[name] for name in dict.fromkeys(names)}
    return space | {d.name: d for d in sweep.space}


def _suggest_head(trial: optuna.Trial, space: dict[str, Dimension]) -> dict:
    """The head's shape and regularisation: shared by both stages (stage 2 pins its source's). A
    dimension that is not searched keeps the value that changes nothing."""
    head = {"size_inner": space["size_inner"].suggest(trial)}
    for name in OPTIONAL_DIMENSIONS:
        head[name] = space[name].suggest(trial) if name in space else 0.0
    return head


def suggest(trial: optuna.Trial, sweep: SweepConfig) -> TrainConfig:
    """Sample one stage-1 trial's configuration; fixed settings come from the sweep."""
    space = resolved_space(sweep)
    lr = space["lr"].suggest(trial)
    return TrainConfig(
        lr=lr, **_suggest_head(trial, space), epochs=sweep.epochs, batch_size=sweep.batch_size, seed=sweep.seed
    )


def suggest_finetune(trial: optuna.Trial, sweep: SweepConfig) -> FinetuneConfig:
    """One stage-2 trial's configuration on top of its source's head: its own blocks, lr, epochs,
    label smoothing, weight averaging and schedule. A fixed recipe pins all of them (the wide ranges
    are what a pinned value may be); a search (`finetune_trials` > 1) samples the blocks in
    [1, finetune_blocks] and the lr in FINETUNE_SEARCH_LR."""
    searching = sweep.finetune_trials > 1
    source = trial.suggest_int("source_trial", 0, MAX_TRIAL_NUMBER)
    blocks = trial.suggest_int("finetune_blocks", 1, sweep.finetune_blocks if searching else MAX_FINETUNE_BLOCKS)
    lr = trial.suggest_float("lr", *(FINETUNE_SEARCH_LR if searching else FINETUNE_LR_RANGE), log=True)
    epochs = trial.suggest_int("epochs", 1, MAX_EPOCHS)
    # Stage 2's own label smoothing, not the source's: its head dimensions are pinned without it.
    head = _suggest_head(trial, {k: v for k, v in resolved_space(sweep).items() if k != "label_smoothing"})
    head["label_smoothing"] = trial.suggest_float("label_smoothing", 0.0, MAX_LABEL_SMOOTHING)
    average = trial.suggest_categorical("average", list(AVERAGES))
    schedule = trial.suggest_categorical("schedule", list(SCHEDULES))
    train_precision = trial.suggest_categorical("train_precision", list(TRAINING_PRECISIONS))
    patience = trial.suggest_int("patience", 0, MAX_EPOCHS)
    lr_decay = trial.suggest_float("lr_decay", 0.0, 1.0)
    train = TrainConfig(lr=lr, **head, epochs=epochs, batch_size=sweep.batch_size, seed=sweep.seed)
    return FinetuneConfig(
        source_trial=source,
        blocks=blocks,
        train=train,
        average=average,
        schedule=schedule,
        train_precision=train_precision,
        patience=patience,
        lr_decay=lr_decay,
    )


def finetune_recipe(sweep: SweepConfig, source: TrialRecord, precision: str) -> dict:
    """The values stage 2 pins: the source trial's head configuration (all of its params but its lr
    and label smoothing), the sweep's stage-2 settings and the training `precision` they resolve to
    (resolve_training_precision); also the blocks and the lr when the recipe is fixed
    (`finetune_trials` 1), as a search samples those."""
    head = {k: v for k, v in source.params.items() if k not in ("lr", "label_smoothing")}
    recipe = {
        **head,
        "source_trial": source.number,
        "epochs": sweep.finetune_epochs,
        "label_smoothing": sweep.finetune_label_smoothing,
        "average": sweep.finetune_average,
        "schedule": sweep.finetune_schedule,
        "train_precision": precision,
        "patience": sweep.finetune_patience,
        "lr_decay": sweep.finetune_lr_decay,
    }
    if sweep.finetune_trials == 1:
        recipe |= {"finetune_blocks": sweep.finetune_blocks, "lr": sweep.finetune_lr}
    return recipe


# Stage-2 params newer than some recorded trials, and what a trial without one trained with.
PARAMS_ADDED_SINCE = {"lr_decay": 1.0}


def of_recipe(params: dict, recipe: dict) -> bool:
    """Whether a stage-2 trial with `params` ran `recipe` (a trial from before a param existed ran
    with that param's PARAMS_ADDED_SINCE value)."""
    return all(params.get(k, PARAMS_ADDED_SINCE.get(k)) == v for k, v in recipe.items())


def describe_space(sweep: SweepConfig) -> dict:
    """Stage 1's space in words, for the study's user attrs (what optuna-dashboard shows)."""
    space = resolved_space(sweep)
    searched = {name: dim.describe() for name, dim in space.items()}
    searched |= {name: "0 (not searched)" for name in OPTIONAL_DIMENSIONS if name not in space}
    fixed = {
        "epochs": sweep.epochs,
        "batch_size": sweep.batch_size,
        "views": sweep.views,
    }
    return {"stage1": {"searched": searched, "fixed": fixed}}


def space_signature(sweep: SweepConfig) -> dict:
    """Stage 1's space as data, and the held-out part of train/ and the image size if not the
    defaults: a resumed study must sample from the same space and train on the same images, seen at
    the same size (a study from before `image_size` existed resumes at 224)."""
    signature = {name: dim.as_dict() for name, dim in sorted(resolved_space(sweep).items())}
    if sweep.holdout:
        signature["holdout"] = {"fraction": sweep.holdout, "seed": sweep.holdout_seed}
    if sweep.image_size != IMAGE_SIZE:
        signature["image_size"] = sweep.image_size
    return signature


def describe_finetune_space(sweep: SweepConfig) -> dict:
    """Stage 2's recipe in words, for the stage-2 study's user attrs."""
    searched = {
        "finetune_blocks": f"int [1, {sweep.finetune_blocks}], cycled deepest first",
        "lr": "log-uniform ({:g}, {:g})".format(*FINETUNE_SEARCH_LR),
    }
    fixed = {"finetune_blocks": sweep.finetune_blocks, "lr": sweep.finetune_lr}
    return {
        "source_trial": (
            "the stage-1 winner"
            if sweep.finetune_sources == 1
            else f"the stage-1 winner, then the next {sweep.finetune_sources - 1} by val_acc"
        ),
        "size_inner, dropout, ...": "the source trial's",
        **(searched if sweep.finetune_trials > 1 else fixed),
        "trials": sweep.finetune_trials,
        "epochs": sweep.finetune_epochs,
        "label_smoothing": sweep.finetune_label_smoothing,
        "average": sweep.finetune_average,
        "schedule": sweep.finetune_schedule,
        "train_precision": sweep.finetune_precision,
        "patience": sweep.finetune_patience,
        "lr_decay": sweep.finetune_lr_decay,
    }
