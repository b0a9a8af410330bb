"""The one table of settings: the command line and a sweep file refuse the same values with the same
words, and the parent run's params are the settings themselves."""

from __future__ import annotations

import click
import pytest
import yaml
from sweep_helpers import mlflow_runs, output_of, run_options, sweep

from sweep.config import SweepConfig, parent_params
from sweep.settings import default_of, settings_of

FILE_SETTINGS = [name for name, (_, how) in settings_of(SweepConfig).items() if how.in_file]
FILE_FLAGS = [name for name, (_, how) in settings_of(SweepConfig).items() if how.in_file and how.flag]
VALUED = [name for name in FILE_SETTINGS if name not in FILE_FLAGS]  # a flag takes no value on the command line


def out_of_bounds(click_type) -> object:
    """A value the setting's own type refuses: past a bound, or not one of the choices."""
    if isinstance(click_type, click.Choice):
        return "no-such-choice"
    if click_type.max is not None:
        return click_type.max + (1 if isinstance(click_type, click.IntRange) else 0.5)
    return click_type.min - 1


def refusal(output: str) -> str:
    """The part of a usage error that says what is wrong with the value (after "...: ")."""
    (line,) = [line for line in output.splitlines() if line.startswith("Error:")]
    return line.rsplit(": ", 1)[-1]


@pytest.mark.parametrize("name", VALUED)
def test_the_command_line_and_a_sweep_file_refuse_the_same_value_with_the_same_words(name, tmp_path):
    value = out_of_bounds(settings_of(SweepConfig)[name][1].type)
    option = "--" + name.replace("_", "-")
    given = sweep("run", option, value, "--data-dir", tmp_path / "nowhere")
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump({name: value}))
    in_file = sweep("run", "--config", config, "--data-dir", tmp_path / "nowhere")
    assert given.exit_code == in_file.exit_code == 2, output_of(given) + output_of(in_file)
    assert refusal(given.output) == refusal(in_file.output), output_of(given) + output_of(in_file)
    assert repr(value) in in_file.output or str(value) in in_file.output  # the file's message names the value
    assert name in in_file.output


@pytest.mark.parametrize("name", FILE_FLAGS)
@pytest.mark.parametrize("value", [1, "yes"])
def test_a_sweep_file_sets_a_switch_only_with_true_or_false(name, value, tmp_path):
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump({name: value}))
    result = sweep("run", "--config", config, "--data-dir", tmp_path / "nowhere")
    assert result.exit_code == 2, output_of(result)
    assert f"{name} is {value!r}; it must be true or false" in result.output, output_of(result)


def test_every_setting_is_an_option_of_run_with_the_dataclass_default():
    from sweep.cli import run

    params = {p.name: p for p in run.params}
    for name, (field, _) in settings_of(SweepConfig).items():
        default = default_of(field)
        default = default() if callable(default) else default
        shown = params[name].get_default(click.Context(run), call=True)
        assert (tuple(shown) if params[name].multiple else shown) == default, name


def test_a_setting_a_file_may_not_hold_is_refused_naming_the_keys_it_may(tmp_path):
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump({"storage": "sqlite:///elsewhere.db"}))
    result = sweep("run", "--config", config, "--data-dir", tmp_path / "nowhere")
    assert result.exit_code == 2 and "unknown key 'storage'" in result.output, output_of(result)
    assert all(name in result.output for name in FILE_SETTINGS)


def test_the_parent_runs_params_are_every_setting_but_the_store_urls(stores, data_dir, tiny_weights):
    result = sweep("run", *run_options(data_dir, tiny_weights, 1, 1), "--search", "dropout", stores=stores)
    assert result.exit_code == 0, output_of(result)
    _, runs = mlflow_runs(stores)
    (parent,) = [r for r in runs if r.data.tags.get("sweep.role") == "study"]
    params = parent.data.params
    secret = {name for name, (_, how) in settings_of(SweepConfig).items() if how.secret}
    assert secret == {"storage", "tracking_uri"} and not secret & params.keys()
    expected = parent_params(
        SweepConfig(
            data_dir=data_dir, backbone_weights=str(tiny_weights), cache_dir=type(data_dir)(stores["--cache-dir"]),
            trials=1, epochs=1, search=("dropout",), quiet=True,
        )
    )  # fmt: skip
    assert {k: v for k, v in params.items() if k in expected} == expected
    assert params["search"] == "dropout" and params["quiet"] == "True"
    assert params.keys() - expected.keys() == {"backbone", "space.lr", "space.size_inner", "space.dropout"}
    assert stores["--storage"] not in params.values() and stores["--tracking-uri"] not in params.values()
