"""The search space: the only place that calls trial.suggest_*."""

from __future__ import annotations

import optuna

from sweep.config import SweepConfig, TrainConfig

LR_RANGE = (1e-4, 1e-1)
SIZE_INNER_CHOICES = (10, 100, 1000)  # the seed's grid; 0 (no inner layer) can be added here


def suggest(trial: optuna.Trial, sweep: SweepConfig) -> TrainConfig:
    """Sample one trial's configuration; fixed settings come from the sweep."""
    return TrainConfig(
        lr=trial.suggest_float("lr", *LR_RANGE, log=True),
        size_inner=trial.suggest_categorical("size_inner", SIZE_INNER_CHOICES),
        epochs=sweep.epochs,
        batch_size=sweep.batch_size,
        seed=sweep.seed,
    )
