"""Sweep files: a YAML file in, the study's distributions and the parent run's record out; bad files and
changed spaces refused before any work."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from optuna.distributions import CategoricalDistribution, FloatDistribution
from sweep_helpers import assert_one_error, data_args, load_study, mlflow_runs, plain_file, recorded, run_options, sweep

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "tests" / "recipe.yaml"  # a sweep file that changes nothing: the defaults, the recipe's space


def write(path: Path, document) -> Path:
    path.write_text(document if isinstance(document, str) else yaml.safe_dump(document))
    return path


SWEEP = {
    "trials": 3,
    "epochs": 1,
    "tolerance": 0.05,
    "image_size": 224,
    "finetune_blocks": 0,  # stage 1 only: the file's settings are what this test reads
    "space": {
        "lr": {"type": "log-float", "low": 1e-3, "high": 1e-2},
        "size_inner": {"type": "categorical", "choices": [10, 100]},
        "weight_decay": {"type": "log-float", "low": 1e-5, "high": 1e-3},
        "dropout": {"type": "float", "low": 0.0, "high": 0.5},
    },
}


def test_a_sweep_file_becomes_the_studys_distributions_and_the_parent_runs_record(
    tmp_path, stores, data_dir, tiny_weights
):
    config = write(tmp_path / "sweep.yaml", SWEEP)
    # trials from the file (3); epochs from the command line, over the file's 1.
    options = [*data_args(data_dir, tiny_weights), "--epochs", "2", "--quiet"]
    result = sweep("run", "--config", config, *options, stores=stores)
    assert result.exit_code == 0, result.output
    study = load_study(stores)
    assert len(study.trials) == 3
    expected = {
        "lr": FloatDistribution(1e-3, 1e-2, log=True),
        "size_inner": CategoricalDistribution([10, 100]),
        "weight_decay": FloatDistribution(1e-5, 1e-3, log=True),
        "dropout": FloatDistribution(0.0, 0.5),
    }
    assert all(t.distributions == expected for t in study.trials)
    assert study.user_attrs["tolerance"] == 0.05

    client, runs = mlflow_runs(stores)
    parent = next(r for r in runs if r.data.tags.get("sweep.role") == "study")
    assert parent.data.params["space.lr"] == "log-uniform (0.001, 0.01)"
    assert parent.data.params["space.dropout"] == "float (0, 0.5)"
    assert (parent.data.params["trials"], parent.data.params["epochs"], parent.data.params["tolerance"]) == (
        "3",
        "2",
        "0.05",
    )
    logged_file = client.download_artifacts(parent.info.run_id, "sweep.yaml", str(tmp_path))
    logged = yaml.safe_load(Path(logged_file).read_text())
    assert logged["trials"] == 3 and logged["epochs"] == 2 and logged["tolerance"] == 0.05
    assert logged["space"] == SWEEP["space"]
    # `best` applies the study's own tolerance unless told otherwise.
    best = sweep("best", stores=stores)
    assert "val_acc >= best val_acc - 0.05" in best.output


BAD_FILES = {
    "unknown key": ("trails: 3", "unknown key 'trails'", "trials"),
    "unknown parameter": ("space: {momentum: {type: float, low: 0, high: 1}}", "space.momentum", "lr, size_inner"),
    "empty range": ("space: {lr: {type: float, low: 0.1, high: 0.01}}", "space.lr is an empty range"),
    "log range from 0": ("space: {weight_decay: {type: log-float, low: 0, high: 0.01}}", "log range", "above 0"),
    "wrong type": ("epochs: ten", "epochs is 'ten'", "an integer in [1, 1000]"),
    "wrong dimension type": ("space: {lr: {type: uniform, low: 0.1, high: 1}}", "space.lr.type", "log-float"),
    "float for an integer": ("space: {size_inner: {type: float, low: 1, high: 9}}", "size_inner takes integers"),
    "not yaml": ("space: [1, 2", "is not valid YAML"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_a_bad_sweep_file_is_one_error_naming_the_key_before_any_work(case, tmp_path, stores, data_dir, tiny_weights):
    text, *fragments = BAD_FILES[case]
    config = write(tmp_path / "bad.yaml", text + "\n")
    result = sweep("run", *run_options(data_dir, tiny_weights, 2, 1), "--config", config, stores=stores)
    assert_one_error(result, "--config", *fragments, code=2)
    assert recorded(stores) == ((), ())


def test_resuming_a_study_with_another_space_is_refused_and_loses_nothing(tmp_path, stores, data_dir, tiny_weights):
    assert sweep("run", *run_options(data_dir, tiny_weights, 2, 1), stores=stores).exit_code == 0
    before = recorded(stores)
    narrower = plain_file(tmp_path, space={"lr": {"type": "log-float", "low": 1e-3, "high": 1e-2}})[1]
    result = sweep("run", *run_options(data_dir, tiny_weights, 4, 1), "--config", narrower, stores=stores)
    assert_one_error(result, "another search space", "lr", "--study NEW_NAME")
    assert recorded(stores) == before
    with_dropout = sweep("run", *run_options(data_dir, tiny_weights, 4, 1), "--config", RECIPE, stores=stores)
    assert_one_error(with_dropout, "another search space", "dropout")  # the recipe's space searches dropout
    # The same space resumes; a new study name takes the new space.
    assert sweep("run", *run_options(data_dir, tiny_weights, 3, 1), stores=stores).exit_code == 0
    assert sweep("run", "--study", "narrow", *run_options(data_dir, tiny_weights, 2, 1), "--config", narrower,
                 stores=stores).exit_code == 0  # fmt: skip
    assert len(load_study(stores).trials) == 3 and len(load_study(stores, "narrow").trials) == 2


def test_make_sweep_runs_the_defaults_which_are_the_recipe():
    makefile = (ROOT / "Makefile").read_text()
    assert "$(PY) -m sweep run $(SWEEP_OPTIONS)" in makefile and "SWEEP_OPTIONS ?=\n" in makefile
