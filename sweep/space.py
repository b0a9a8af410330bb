"""The search space: the only place that calls trial.suggest_*.

Stage 1 searches `lr` and `size_inner` (the seed's grid) and, by default, `dropout`; a sweep file's
`space` replaces the default space (lr and size_inner stay searched, at their defaults unless the file
gives them), so `sweeps/plain.yaml` searches the seed's two alone. A dimension that is not searched
keeps the value that changes nothing (0). Stage 2 pins every value it suggests (sweep.objective).
"""

from __future__ import annotations

from dataclasses import dataclass

import optuna


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


# Every searchable parameter with its default dimension: the seed's two, then the opt-in ones.
DIMENSIONS = {
    "lr": Dimension("lr", "log-float", 1e-4, 1e-1),
    "size_inner": Dimension("size_inner", "categorical", choices=(10, 100, 1000)),  # 0: no inner layer
    "dropout": Dimension("dropout", "categorical", choices=(0.0, 0.2, 0.5)),
    "weight_decay": Dimension("weight_decay", "log-float", 1e-6, 1e-2),
    "label_smoothing": Dimension("label_smoothing", "categorical", choices=(0.0, 0.1, 0.2)),
}
ALWAYS_SEARCHED = ("lr", "size_inner")
DEFAULT_SPACE = (*ALWAYS_SEARCHED, "dropout")  # the recipe's (docs/benchmarks.md)
OPTIONAL = tuple(name for name in DIMENSIONS if name not in ALWAYS_SEARCHED)


def resolve(dimensions: tuple[Dimension, ...] | None) -> tuple[Dimension, ...]:
    """Stage 1's space: the default one, or a sweep file's `dimensions` over lr and size_inner."""
    if dimensions is None:
        return tuple(DIMENSIONS[name] for name in DEFAULT_SPACE)
    given = {d.name: d for d in dimensions}
    return tuple(given.pop(name, DIMENSIONS[name]) for name in ALWAYS_SEARCHED) + tuple(given.values())


def suggest_head(trial: optuna.Trial, space: tuple[Dimension, ...]) -> dict:
    """Stage 1's configuration of a head: lr, size_inner and the optional dimensions (0 when not
    searched), suggested in DIMENSIONS' order whatever the file's, so a seed draws the same values."""
    searched = {dim.name: dim for dim in space}
    return {name: searched[name].suggest(trial) if name in searched else 0.0 for name in DIMENSIONS}


def describe(space: tuple[Dimension, ...]) -> dict[str, str]:
    """The space in words, for the study's user attrs and the parent run's params."""
    searched = {dim.name: dim.describe() for dim in space}
    return searched | {name: "0 (not searched)" for name in OPTIONAL if name not in searched}
