"""A sweep described in a YAML file (`run --config sweeps/default.yaml`): settings and search space.

The file's settings become the defaults of `run`'s options, so an option on the command line wins
over the file. Each value is checked by its setting's own type (`sweep.settings`), so a file and the
command line refuse the same values with the same words; everything is checked before any work, and
a mistake is one message naming the key and what it may be.
"""

from __future__ import annotations

import math
from pathlib import Path

import yaml

from clothing.data import shown
from sweep.config import OPTIONAL_DIMENSIONS, SweepConfig
from sweep.settings import SettingError, check_file_value, is_integer, settings_of
from sweep.space import DEFAULT_DIMENSIONS, Dimension


class SweepFileError(ValueError):
    """The sweep file cannot be used; the message names the key and what it may be."""


def _number(value) -> bool:
    return (is_integer(value) or isinstance(value, float)) and math.isfinite(value)


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
    _refuse_unknown_keys(where, kind, spec)
    integer = name in INTEGER_PARAMETERS or kind == "int"
    if integer and kind in ("float", "log-float"):
        raise SweepFileError(f"{where}.type is {kind}; {name} takes integers: int or categorical")
    values = _Values(name, integer)
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise SweepFileError(f"{where}.choices must be a non-empty list")
        if not all(values.fits(c) for c in choices):
            raise SweepFileError(f"{where}.choices must be {values.what}")
        return Dimension(name, kind, choices=tuple(choices))
    for key in ("low", "high"):
        if not values.fits(spec.get(key)):
            raise SweepFileError(f"{where}.{key} must be one of the {values.what}")
    low, high = spec["low"], spec["high"]
    if not low < high:
        raise SweepFileError(f"{where} is an empty range: low ({low:g}) must be below high ({high:g})")
    if kind == "log-float" and low <= 0:
        raise SweepFileError(f"{where} is a log range, so low must be above 0 (it is {low:g})")
    return Dimension(name, kind, float(low) if not integer else low, float(high) if not integer else high)


def _refuse_unknown_keys(where: str, kind: str, spec: dict) -> None:
    allowed = {"type", "choices"} if kind == "categorical" else {"type", "low", "high"}
    for key in spec:
        if key not in allowed:
            raise SweepFileError(f"unknown key {where}.{key}; a {kind} dimension has {', '.join(sorted(allowed))}")


class _Values:
    """What a parameter's values may be: integers or numbers within its VALUE_BOUNDS."""

    def __init__(self, name: str, integer: bool) -> None:
        self.low, self.high = VALUE_BOUNDS[name]
        self.integer = integer
        self.what = f"{'integers' if integer else 'numbers'} in [{self.low:g}, {self.high:g}]"

    def fits(self, value) -> bool:
        return (is_integer(value) if self.integer else _number(value)) and self.low <= value <= self.high


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
        try:
            settings[key] = check_file_value(SweepConfig, key, value)
        except SettingError as exc:
            raise SweepFileError(str(exc)) from exc
    space = data.get("space") or {}
    if not isinstance(space, dict):
        raise SweepFileError("space must be a mapping of parameter names to dimensions")
    for name in space:
        if name not in DEFAULT_DIMENSIONS:
            names = ", ".join(["lr", "size_inner", *OPTIONAL_DIMENSIONS])
            raise SweepFileError(f"unknown parameter space.{name}; the searchable ones are {names}")
    return settings, tuple(_dimension(name, spec) for name, spec in space.items())


def file_settings(cfg: SweepConfig) -> dict:
    """The settings a sweep file may hold, as `cfg` resolved them (file, then command line)."""
    return {name: getattr(cfg, name) for name, (_, how) in settings_of(SweepConfig).items() if how.in_file}


def resolved_file(cfg: SweepConfig, space: dict[str, Dimension]) -> str:
    """The resolved sweep (every setting a file holds, the whole space) as a sweep file: what the run used."""
    document = {**file_settings(cfg), "space": {name: dim.as_dict() for name, dim in space.items()}}
    return yaml.safe_dump(document, sort_keys=False)
