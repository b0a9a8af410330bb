"""A sweep described in a YAML file (`run --config sweeps/default.yaml`): settings and search space.

The file's settings become the defaults of `run`'s options, so an option on the command line wins
over the file. Everything is checked before any work, and a mistake is one message naming the key
and what it may be.
"""

from __future__ import annotations

import math
from pathlib import Path

import yaml

from clothing.data import shown
from clothing.engines import ENGINES
from clothing.extract import PRECISIONS
from clothing.model import MAX_FINETUNE_BLOCKS
from sweep.space import (
    AVERAGES,
    DEFAULT_DIMENSIONS,
    FINETUNE_LR_RANGE,
    MAX_EPOCHS,
    MAX_LABEL_SMOOTHING,
    OPTIONAL_DIMENSIONS,
    SCHEDULES,
    Dimension,
)


class SweepFileError(ValueError):
    """The sweep file cannot be used; the message names the key and what it may be."""


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # YAML's true is not 1 here


def _number(value) -> bool:
    return (_integer(value) or isinstance(value, float)) and math.isfinite(value)


def _int_in(low: int, high: int):
    return lambda v: _integer(v) and low <= v <= high, f"an integer in [{low}, {high}]"


def _number_in(low: float, high: float):
    return lambda v: _number(v) and low <= v <= high, f"a number in [{low:g}, {high:g}]"


def _one_of(*choices):
    return lambda v: v in choices, f"one of {', '.join(map(str, choices))}"


# Settings a file may hold: name -> (check, what it may be). The names are `run`'s options.
SETTINGS = {
    "trials": _int_in(1, 1_000_000),
    "epochs": _int_in(1, MAX_EPOCHS),
    "batch_size": _int_in(1, 65_536),
    "seed": _int_in(0, 2**32 - 1),
    "pruner": _one_of("median", "none"),
    "precision": _one_of(*PRECISIONS),
    "engine": _one_of(*ENGINES),
    "views": _int_in(1, 16),
    "tolerance": _number_in(0, 1),
    "finetune_blocks": _int_in(0, MAX_FINETUNE_BLOCKS),
    "finetune_epochs": _int_in(1, MAX_EPOCHS),
    "finetune_lr": _number_in(*FINETUNE_LR_RANGE),
    "finetune_trials": _int_in(1, 100),
    "finetune_average": _one_of(*AVERAGES),
    "finetune_schedule": _one_of(*SCHEDULES),
    "finetune_label_smoothing": _number_in(0, MAX_LABEL_SMOOTHING),
}
KINDS = ("float", "log-float", "int", "categorical")
# What each parameter's values may be, whatever range a file gives.
VALUE_BOUNDS = {
    "lr": (0.0, 10.0),
    "size_inner": (0, 100_000),
    "dropout": (0.0, 0.99),
    "weight_decay": (0.0, 1.0),
    "label_smoothing": (0.0, 0.99),
}
INTEGER_PARAMETERS = ("size_inner",)


def _dimension(name: str, spec) -> Dimension:
    where = f"space.{name}"
    if not isinstance(spec, dict):
        raise SweepFileError(f"{where} must be a mapping with a type: one of {', '.join(KINDS)}")
    kind = spec.get("type")
    if kind not in KINDS:
        raise SweepFileError(f"{where}.type is {kind!r}; it must be one of {', '.join(KINDS)}")
    allowed = {"type", "choices"} if kind == "categorical" else {"type", "low", "high"}
    for key in spec:
        if key not in allowed:
            raise SweepFileError(f"unknown key {where}.{key}; a {kind} dimension has {', '.join(sorted(allowed))}")
    low_bound, high_bound = VALUE_BOUNDS[name]
    integer = name in INTEGER_PARAMETERS or kind == "int"
    kind_of_value = "integers" if integer else "numbers"

    def in_bounds(value) -> bool:
        return (_integer(value) if integer else _number(value)) and low_bound <= value <= high_bound

    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise SweepFileError(f"{where}.choices must be a non-empty list")
        if not all(in_bounds(c) for c in choices):
            raise SweepFileError(f"{where}.choices must be {kind_of_value} in [{low_bound:g}, {high_bound:g}]")
        return Dimension(name, kind, choices=tuple(choices))
    if integer and kind in ("float", "log-float"):
        raise SweepFileError(f"{where}.type is {kind}; {name} takes integers: int or categorical")
    for key in ("low", "high"):
        if not in_bounds(spec.get(key)):
            raise SweepFileError(f"{where}.{key} must be one of the {kind_of_value} in [{low_bound:g}, {high_bound:g}]")
    low, high = spec["low"], spec["high"]
    if not low < high:
        raise SweepFileError(f"{where} is an empty range: low ({low:g}) must be below high ({high:g})")
    if kind == "log-float" and low <= 0:
        raise SweepFileError(f"{where} is a log range, so low must be above 0 (it is {low:g})")
    return Dimension(name, kind, float(low) if not integer else low, float(high) if not integer else high)


def read_sweep_file(path: Path) -> tuple[dict, tuple[Dimension, ...]]:
    """(the settings, as defaults for `run`'s options; the space's dimensions) of a sweep file."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise SweepFileError(f"cannot read {shown(path)}: {exc.strerror or exc}") from exc
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise SweepFileError(f"{shown(path)} is not valid YAML ({str(exc).splitlines()[0]})") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SweepFileError(f"{shown(path)} must be a mapping of settings and a `space`")
    settings = {}
    for key, value in data.items():
        if key == "space":
            continue
        if key not in SETTINGS:
            raise SweepFileError(f"unknown key {key!r}; a sweep file has: space, {', '.join(SETTINGS)}")
        check, allowed = SETTINGS[key]
        if not check(value):
            raise SweepFileError(f"{key} is {value!r}; it must be {allowed}")
        settings[key] = value
    space = data.get("space") or {}
    if not isinstance(space, dict):
        raise SweepFileError("space must be a mapping of parameter names to dimensions")
    for name in space:
        if name not in DEFAULT_DIMENSIONS:
            names = ", ".join(["lr", "size_inner", *OPTIONAL_DIMENSIONS])
            raise SweepFileError(f"unknown parameter space.{name}; the searchable ones are {names}")
    return settings, tuple(_dimension(name, spec) for name, spec in space.items())


def resolved_file(settings: dict, space: dict[str, Dimension]) -> str:
    """The resolved sweep (every setting, the whole space) as a sweep file: what the run used."""
    document = {**settings, "space": {name: dim.as_dict() for name, dim in space.items()}}
    return yaml.safe_dump(document, sort_keys=False)
