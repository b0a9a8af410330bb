"""The search space: the only place that calls trial.suggest_*."""

from __future__ import annotations

import optuna

from sweep.config import SweepConfig, TrainConfig

LR_RANGE = (1e-4, 1e-1)
SIZE_INNER_CHOICES = (10, 100, 1000)  # the seed's grid; 0 (no inner layer) can be added here
# Opt-in dimensions (`run --search NAME`); off, each keeps the value that changes nothing.
OPTIONAL_DIMENSIONS = ("dropout", "weight_decay", "label_smoothing")
DROPOUT_CHOICES = (0.0, 0.2, 0.5)
WEIGHT_DECAY_RANGE = (1e-6, 1e-2)
LABEL_SMOOTHING_CHOICES = (0.0, 0.1, 0.2)


def suggest(trial: optuna.Trial, sweep: SweepConfig) -> TrainConfig:
    """Sample one trial's configuration; fixed settings come from the sweep."""
    search = set(sweep.search)
    return TrainConfig(
        lr=trial.suggest_float("lr", *LR_RANGE, log=True),
        size_inner=trial.suggest_categorical("size_inner", SIZE_INNER_CHOICES),
        dropout=trial.suggest_categorical("dropout", DROPOUT_CHOICES) if "dropout" in search else 0.0,
        weight_decay=(
            trial.suggest_float("weight_decay", *WEIGHT_DECAY_RANGE, log=True) if "weight_decay" in search else 0.0
        ),
        label_smoothing=(
            trial.suggest_categorical("label_smoothing", LABEL_SMOOTHING_CHOICES)
            if "label_smoothing" in search
            else 0.0
        ),
        epochs=sweep.epochs,
        batch_size=sweep.batch_size,
        seed=sweep.seed,
    )
