"""A held-out part of train/ that no trial and no rule ever sees: the honest accuracy estimate.

The validation split picks the winner, so the winner's val_acc is optimistic, and tuning defaults on it
tunes them to those 341 images. `run --holdout 0.1 --holdout-seed S` leaves a stratified 10 % of the
training images out of the sweep (the feature cache still holds all of them, so seeds share it);
`make bench-accuracy` then scores the winner on them. Which rows are held out is a pure function of
the labels, the fraction and the seed.
"""

from __future__ import annotations

import numpy as np
import torch

HOLDOUT_FRACTION = 0.1  # what bench-accuracy holds out
HOLDOUT_SEEDS = (0, 1, 2)


def holdout_rows(labels: torch.Tensor | np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept rows, held-out rows), both sorted: `fraction` of each class, rounded, at least one image
    of any class that has two or more, chosen by a generator seeded with `seed` alone."""
    if not 0 < fraction < 1:
        raise ValueError(f"the held-out fraction must be in (0, 1), got {fraction}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    held = []
    for label in np.unique(labels):  # sorted, so the draws do not depend on the order classes appear
        rows = np.flatnonzero(labels == label)
        count = min(max(round(fraction * len(rows)), 1), len(rows) - 1)
        held.append(rng.permutation(rows)[:count])
    held_rows = np.sort(np.concatenate(held)) if held else np.empty(0, dtype=np.int64)
    return np.setdiff1d(np.arange(len(labels)), held_rows), held_rows
