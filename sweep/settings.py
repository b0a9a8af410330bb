"""The one table of `run`'s settings: each is declared once, as a field of `SweepConfig` made by
`setting()`, with its type (bounds included), default and help. From that one declaration come the
click option (`option_for`), the sweep-file check (`check_file_value`), the dataclass default and the
parent run's params (`config.parent_params`), so a bound cannot differ between the command line and
a file.

The types are click's, so the command line and a file are converted, and refused, by the same code
with the same message.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import click

MAX_JOBS = 64  # worker processes on one machine; more is a typo, not a plan (each holds a torch runtime)
METADATA_KEY = "sweep.setting"


class FiniteFloat(click.FloatRange):
    """A FloatRange that also refuses nan and +-inf (click's own lets nan through every bound)."""

    name = "finite float"

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


class Jobs(click.IntRange):
    """A number of worker processes, or "auto": one per CPU core."""

    name = "integer or auto"

    def __init__(self) -> None:
        super().__init__(1, MAX_JOBS)

    def convert(self, value, param, ctx):
        if value == "auto":
            return min(os.cpu_count() or 1, MAX_JOBS)
        return super().convert(value, param, ctx)


@dataclass(frozen=True)
class Setting:
    """How one SweepConfig field is set: its click type and help, and where it may come from."""

    type: Any  # a click.ParamType, or a Python type for a flag
    help: str
    in_file: bool = False  # a sweep file may set it
    secret: bool = False  # never a param: a store URL may hold a password
    envvar: str | None = None
    show_default: Any = True
    flag: str | None = None  # the option's declaration when it is a boolean flag ("--quiet", "--a/--no-a")
    multiple: bool = False


def setting(default: Any = dataclasses.MISSING, type: Any = None, help: str = "", **how: Any) -> Any:  # noqa: A002
    """A SweepConfig field and its setting; a callable `default` is computed when the config is made
    (and by click, when the command runs)."""
    meta = {METADATA_KEY: Setting(type, help, **how)}
    if callable(default):
        return dataclasses.field(default_factory=default, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def settings_of(config_class: type) -> dict[str, tuple[dataclasses.Field, Setting]]:
    """Every field of `config_class` that is a setting, by name, in declaration order."""
    return {
        f.name: (f, f.metadata[METADATA_KEY]) for f in dataclasses.fields(config_class) if METADATA_KEY in f.metadata
    }


def default_of(field: dataclasses.Field) -> Any:
    return field.default_factory if field.default is dataclasses.MISSING else field.default


def option_for(field: dataclasses.Field, how: Setting, **override: Any) -> Callable:
    """The click option of one setting (`override` changes its keyword arguments, e.g. the default)."""
    declaration = how.flag or "--" + field.name.replace("_", "-")
    kwargs: dict[str, Any] = {"help": how.help, "show_default": how.show_default}
    if how.flag is None:
        kwargs |= {"type": how.type, "multiple": how.multiple}
    else:
        kwargs["is_flag"] = True
    if how.envvar:
        kwargs["envvar"] = how.envvar
    kwargs["default"] = default_of(field)
    kwargs |= override
    return click.option(declaration, field.name, **kwargs)


def options(config_class: type, *names: str, **overrides: dict) -> Callable:
    """A decorator adding the click options of `names` (all settings when none is named); `overrides`
    maps a name to keyword arguments that differ for this command."""
    table = settings_of(config_class)

    def decorate(command: Callable) -> Callable:
        for name in reversed(names or tuple(table)):
            command = option_for(*table[name], **overrides.get(name, {}))(command)
        return command

    return decorate


class SettingError(ValueError):
    """A value for a setting is refused; the message says which and what it may be (click's words)."""


def is_integer(value: Any) -> bool:
    """An integer, and not a bool (YAML's `true` is not 1 here)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _in(click_type: Any) -> str:
    low, high = getattr(click_type, "min", None), getattr(click_type, "max", None)
    return "" if low is None or high is None else f" in [{low:g}, {high:g}]"


def _right_kind(click_type: Any, value: Any) -> str | None:
    """What a file value must be, when it is not: YAML's `true` is not 1, and "5" is not 5."""
    integer = is_integer(value)
    if isinstance(click_type, click.types.IntParamType) and not integer:
        return f"an integer{_in(click_type)}"
    if isinstance(click_type, click.types.FloatParamType) and not (integer or isinstance(value, float)):
        return f"a number{_in(click_type)}"
    if isinstance(click_type, click.types.BoolParamType) and not isinstance(value, bool):
        return "true or false"
    if isinstance(click_type, click.Choice) and not isinstance(value, str):
        return f"one of {', '.join(map(str, click_type.choices))}"
    return None


def check_file_value(config_class: type, name: str, value: Any) -> Any:
    """A sweep file's value for `name`, converted by the setting's own click type; SettingError when
    the file may not set it or the type refuses it, with the message the command line would give."""
    table = settings_of(config_class)
    in_file = [n for n, (_, how) in table.items() if how.in_file]
    if name not in in_file:
        raise SettingError(f"unknown key {name!r}; a sweep file has: space, {', '.join(in_file)}")
    click_type = table[name][1].type
    wanted = _right_kind(click_type, value)
    if wanted is not None:
        raise SettingError(f"{name} is {value!r}; it must be {wanted}")
    try:
        return click_type.convert(value, None, None)
    except click.BadParameter as exc:
        raise SettingError(f"{name} is {value!r}: {exc.message}") from exc
