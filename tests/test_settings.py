"""The one table of settings: the command line and a sweep file refuse the same values with the same
words, every default is the recipe's, and the parent run's params are the settings themselves."""

from __future__ import annotations

import pickle
from dataclasses import replace

import click
import pytest
import yaml
from sweep_helpers import PLAIN, THOROUGH, mlflow_runs, output_of, run_options, sweep

from sweep.config import SETTINGS, SweepConfig, read_sweep_file
from sweep.settings import default_of
from sweep.space import resolve

ON_BOTH = [name for name, (_, how) in SETTINGS.items() if how.in_file and how.cli]
FILE_ONLY = [name for name, (_, how) in SETTINGS.items() if how.in_file and not how.cli]


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


@pytest.mark.parametrize("name", ON_BOTH)
def test_the_command_line_and_a_sweep_file_refuse_the_same_value_with_the_same_words(name, tmp_path):
    value = out_of_bounds(SETTINGS[name][1].type)
    option = "--" + name.replace("_", "-")
    given = sweep("run", option, value, "--data-dir", tmp_path / "nowhere")
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump({name: value}))
    in_file = sweep("run", "--config", config, "--data-dir", tmp_path / "nowhere")
    assert given.exit_code == in_file.exit_code == 2, output_of(given) + output_of(in_file)
    assert refusal(given.output) == refusal(in_file.output), output_of(given) + output_of(in_file)
    assert repr(value) in in_file.output or str(value) in in_file.output  # the file's message names the value
    assert name in in_file.output


@pytest.mark.parametrize("name", FILE_ONLY)
def test_a_file_only_setting_is_checked_like_the_others_and_is_no_option(name, tmp_path):
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump({name: out_of_bounds(SETTINGS[name][1].type)}))
    in_file = sweep("run", "--config", config, "--data-dir", tmp_path / "nowhere")
    assert in_file.exit_code == 2 and name in in_file.output, output_of(in_file)
    given = sweep("run", "--" + name.replace("_", "-"), "1", "--data-dir", tmp_path / "nowhere")
    assert given.exit_code == 2 and "No such option" in given.output, output_of(given)


def test_every_option_of_run_has_the_settings_default_and_the_defaults_are_the_recipe():
    from sweep.cli import run

    params = {p.name: p for p in run.params}
    for name, (field, how) in SETTINGS.items():
        if how.cli:
            assert params[name].get_default(click.Context(run), call=True) == default_of(field), name
    recipe = SweepConfig()
    assert (recipe.data.image_size, recipe.data.views, recipe.stage1.tolerance) == (256, 2, 0.01)
    stage2 = recipe.stage2
    assert (stage2.finetune_blocks, stage2.finetune_lr, stage2.finetune_epochs, stage2.finetune_patience) == (
        3,
        1e-4,
        6,
        1,
    )
    assert [d.name for d in recipe.stage1.space] == ["lr", "size_inner", "dropout"]


def test_the_thorough_sweep_file_is_the_recipe_with_ten_fine_tuned_blocks_for_at_most_three_epochs():
    settings, dimensions = read_sweep_file(THOROUGH)
    assert settings == {"finetune_blocks": 10, "finetune_epochs": 3} and dimensions is None
    thorough, recipe = SweepConfig.of(dimensions, **settings), SweepConfig()
    assert thorough.stage2 == replace(recipe.stage2, finetune_blocks=10, finetune_epochs=3)
    assert (thorough.data, thorough.stage1) == (recipe.data, recipe.stage1)


def test_the_plain_sweep_file_is_the_head_only_sweep():
    settings, dimensions = read_sweep_file(PLAIN[1])
    plain = SweepConfig.of(dimensions, **settings)
    assert (plain.data.image_size, plain.data.views, plain.stage1.tolerance, plain.stage2.finetune_blocks) == (
        224,
        1,
        0.02,
        0,
    )
    assert plain.stage1.space == resolve(()) and [d.name for d in plain.stage1.space] == ["lr", "size_inner"]


def test_a_setting_a_file_may_not_hold_is_refused_naming_the_keys_it_may(tmp_path):
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump({"storage": "sqlite:///elsewhere.db"}))
    result = sweep("run", "--config", config, "--data-dir", tmp_path / "nowhere")
    assert result.exit_code == 2 and "unknown key 'storage'" in result.output, output_of(result)
    assert all(name in result.output for name in ON_BOTH + FILE_ONLY)


def test_the_config_reaches_a_spawned_worker_unchanged():
    """A `--jobs` worker is a spawned process: it receives the main process's config pickled."""
    cfg = SweepConfig.of(resolve(()), quiet=True, study="s", trials=7, views=3, finetune_lr=1e-5, skip_bad_images=True)
    assert cfg.stores.shown_storage  # a cached value travels along, and changes nothing
    assert pickle.loads(pickle.dumps(cfg)) == cfg


def test_the_parent_runs_params_are_every_setting_but_the_store_urls(stores, data_dir, tiny_weights):
    result = sweep("run", *run_options(data_dir, tiny_weights, 1, 1), stores=stores)
    assert result.exit_code == 0, output_of(result)
    _, runs = mlflow_runs(stores)
    (parent,) = [r for r in runs if r.data.tags.get("sweep.role") == "study"]
    params = parent.data.params
    secret = {name for name, (_, how) in SETTINGS.items() if how.secret}
    assert secret == {"storage", "tracking_uri"} and not secret & params.keys()
    settings, dimensions = read_sweep_file(PLAIN[1])
    given = {"data_dir": data_dir, "backbone_weights": str(tiny_weights), "trials": 1, "epochs": 1}
    given["cache_dir"] = type(data_dir)(stores["--cache-dir"])
    expected = SweepConfig.of(dimensions, **{**settings, **given}).params()
    assert {k: v for k, v in params.items() if k in expected} == expected
    assert params["image_size"] == "224" and params["space.lr"] == "log-uniform (0.0001, 0.1)"
    assert params.keys() - expected.keys() == {"backbone"}
    assert stores["--storage"] not in params.values() and stores["--tracking-uri"] not in params.values()
