"""The machinery of the one table of settings (the table itself is `sweep.config`).

Each setting is a field of a section dataclass, made by `setting()` with its click type (bounds
included), default and help, once. From that one declaration come the click option (`options`), the
sweep-file check (`check_file_value`), the dataclass default and the parent run's params. The types
are click's, so the command line and a file are converted, and refused, by the same code with the
same message. `--help` lists the options under their section's heading, as timm's train.py groups
its argparse options.
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
    """How one field is set: its click type and help, and where it may come from."""

    type: Any  # a click.ParamType, or bool for a flag
    help: str
    in_file: bool = False  # a sweep file may hold it
    cli: bool = True  # an option of `run`; False: only a sweep file sets it (a bench's instrument)
    secret: bool = False  # never a param, a tag or a printed line (a store URL may hold a password)
    envvar: str | None = None
    show_default: Any = True
    flag: str | None = None  # the option's declaration when it is a boolean flag ("--quiet")


def setting(default: Any, type: Any, help: str, **how: Any) -> Any:  # noqa: A002 - click's own names
    """A section field and its setting; a callable `default` is computed when the config is made (and
    by click, when the command runs)."""
    meta = {METADATA_KEY: Setting(type, help, **how)}
    if callable(default):
        return dataclasses.field(default_factory=default, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def settings_of(*sections: type) -> dict[str, tuple[dataclasses.Field, Setting]]:
    """Every setting of `sections`, by name, in declaration order."""
    return {
        f.name: (f, f.metadata[METADATA_KEY])
        for section in sections
        for f in dataclasses.fields(section)
        if METADATA_KEY in f.metadata
    }


def default_of(field: dataclasses.Field) -> Any:
    """The field's default, a callable one computed."""
    return field.default_factory() if field.default is dataclasses.MISSING else field.default


class GroupedOption(click.Option):
    """An option that knows the heading `--help` lists it under."""

    def __init__(self, *args: Any, group: str = "Options", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.group = group


class GroupedCommand(click.Command):
    """A command whose `--help` lists its options under their headings, in the order they come."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        groups: dict[str, list[tuple[str, str]]] = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is not None:
                groups.setdefault(getattr(param, "group", "Options"), []).append(record)
        for title, records in groups.items():
            with formatter.section(title):
                formatter.write_dl(records)


def option(*declarations: str, group: str = "Options", **kwargs: Any) -> Callable:
    """click.option, listed under `group` in `--help`."""
    return click.option(*declarations, cls=GroupedOption, group=group, **kwargs)


def option_for(field: dataclasses.Field, how: Setting, group: str, **override: Any) -> Callable:
    """The click option of one setting (`override` changes its keyword arguments, e.g. the default)."""
    declaration = how.flag or "--" + field.name.replace("_", "-")
    kwargs: dict[str, Any] = {"help": how.help, "show_default": how.show_default}
    kwargs |= {"is_flag": True} if how.flag else {"type": how.type}
    if how.envvar:
        kwargs["envvar"] = how.envvar
    kwargs["default"] = field.default_factory if field.default is dataclasses.MISSING else field.default
    return option(declaration, field.name, group=group, **(kwargs | override))


def options(section: type, *names: str, **overrides: dict) -> Callable:
    """A decorator adding the click options of `section`'s settings (`names` only, when given), under
    the section's heading (its TITLE); `overrides` maps a name to keyword arguments that differ for
    this command."""
    table = {name: entry for name, entry in settings_of(section).items() if entry[1].cli}
    wanted = names or tuple(table)

    def decorate(command: Callable) -> Callable:
        for name in reversed(wanted):
            command = option_for(*table[name], section.TITLE, **overrides.get(name, {}))(command)
        return command

    return decorate


class SettingError(ValueError):
    """A value for a setting is refused; the message says which and what it may be (click's words)."""


def is_integer(value: Any) -> bool:
    """An integer, and not a bool (YAML's `true` is not 1 here)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite int or float, and not a bool."""
    return (is_integer(value) or isinstance(value, float)) and math.isfinite(value)


def _in(click_type: Any) -> str:
    low, high = getattr(click_type, "min", None), getattr(click_type, "max", None)
    return "" if low is None or high is None else f" in [{low:g}, {high:g}]"


def _right_kind(click_type: Any, value: Any) -> str | None:
    """What a file value must be, when it is not: YAML's `true` is not 1, and "5" is not 5."""
    if click_type is bool or isinstance(click_type, click.types.BoolParamType):
        return None if isinstance(value, bool) else "true or false"
    if isinstance(click_type, click.types.IntParamType) and not is_integer(value):
        return f"an integer{_in(click_type)}"
    if isinstance(click_type, click.types.FloatParamType) and not (is_integer(value) or isinstance(value, float)):
        return f"a number{_in(click_type)}"
    if isinstance(click_type, click.Choice) and not isinstance(value, str):
        return f"one of {', '.join(map(str, click_type.choices))}"
    return None


def check_file_value(table: dict[str, tuple[dataclasses.Field, Setting]], name: str, value: Any) -> Any:
    """A sweep file's value for `name`, converted by the setting's own click type; SettingError when
    the file may not set it or the type refuses it, with the message the command line would give."""
    in_file = [n for n, (_, how) in table.items() if how.in_file]
    if name not in in_file:
        raise SettingError(f"unknown key {name!r}; a sweep file has: space, {', '.join(in_file)}")
    click_type = table[name][1].type
    wanted = _right_kind(click_type, value)
    if wanted is not None:
        raise SettingError(f"{name} is {value!r}; it must be {wanted}")
    if click_type is bool:
        return value
    try:
        return click_type.convert(value, None, None)
    except click.BadParameter as exc:
        raise SettingError(f"{name} is {value!r}: {exc.message}") from exc
