"""One sweep's state per process, one ranking per command: the storage is built once, each study loaded
once and the winner derived once, and every view of the winner (run's table, the parent run, `best`)
agrees."""

from __future__ import annotations

import re
from collections import Counter

import optuna
import pytest
import yaml
from sweep_helpers import PLAIN, data_args, mlflow_runs, output_of, sweep, trial_records

from bench.images import ALL_CLASSES, make_split
from sweep import pipeline, ranking
from sweep import study as study_module
from sweep.config import Stage1Settings
from sweep.ranking import select_winner


@pytest.fixture
def counted(monkeypatch) -> Counter:
    """Counts of the calls that build a storage, open a study and derive a winner; each still runs."""
    calls: Counter = Counter()

    def counting(name, function):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)

        return wrapper

    make_storage = counting("make_storage", study_module.make_storage)
    for module in (study_module, pipeline):
        monkeypatch.setattr(module, "make_storage", make_storage)
    monkeypatch.setattr(optuna, "create_study", counting("create_study", optuna.create_study))
    monkeypatch.setattr(optuna, "load_study", counting("load_study", optuna.load_study))
    monkeypatch.setattr(ranking, "select_winner", counting("select_winner", select_winner))
    return calls


def test_a_sweep_builds_its_storage_once_opens_each_study_once_and_ranks_once(counted, stores, data_dir, tiny_weights):
    options = [*PLAIN, *data_args(data_dir, tiny_weights), "--trials", "3", "--epochs", "2", "--quiet"]
    result = sweep("run", *options, stores=stores)
    assert result.exit_code == 0, output_of(result)
    # A new study: looked for once (not there), then created once; one ranking for the table and MLflow.
    assert counted == {"make_storage": 1, "load_study": 1, "create_study": 1, "select_winner": 1}

    counted.clear()
    resumed = sweep("run", *options, "--trials", "4", "--finetune-blocks", "1", "--finetune-epochs", "1", stores=stores)
    assert resumed.exit_code == 0, output_of(resumed)
    # Resumed: stage 1 loaded once, stage 2 created once; two rankings of two records: stage 1's alone
    # (stage 2's source), then both stages' (the table and MLflow).
    assert counted == {"make_storage": 1, "load_study": 1, "create_study": 1, "select_winner": 2}

    counted.clear()
    best = sweep("best", *data_args(data_dir, tiny_weights), stores=stores)
    assert best.exit_code == 0, output_of(best)
    assert counted == {"make_storage": 1, "load_study": 2, "select_winner": 1}  # stage 1 and stage 2, once each


def starred(table: str) -> str:
    (row,) = [line for line in table.splitlines() if line.startswith("* ")]
    return row.split()[1]


def test_runs_star_the_parent_run_and_best_name_one_winner_under_the_recipes_tolerance(tmp_path, stores, tiny_weights):
    data_dir = tmp_path / "data"
    make_split(data_dir / "train", classes=ALL_CLASSES, per_class=8)
    make_split(data_dir / "validation", classes=ALL_CLASSES, per_class=6, seed=50_000)
    tolerance = 0.1  # a band wider than the default
    config = tmp_path / "sweep.yaml"
    plain = yaml.safe_load(open(PLAIN[1]))
    config.write_text(yaml.safe_dump({**plain, "trials": 6, "epochs": 3, "tolerance": tolerance, "precision": "fp32"}))
    result = sweep("run", "--config", config, *data_args(data_dir, tiny_weights), "--quiet", stores=stores)
    assert result.exit_code == 0, output_of(result)
    records = trial_records(stores)
    winner = select_winner(records, tolerance)
    # The sweep is one where the band matters: the default band would pick another trial (as run's
    # table did before it read the one ranking).
    assert select_winner(records, Stage1Settings().tolerance).name != winner.name

    assert starred(result.output) == winner.name
    _, runs = mlflow_runs(stores)
    (parent,) = [r for r in runs if r.data.tags.get("sweep.role") == "study"]
    assert parent.data.tags["sweep.winner_trial"] == winner.name
    assert parent.data.metrics["winner/trial"] == winner.number
    assert parent.data.tags["sweep.tolerance"] == str(tolerance)
    (tagged,) = [r for r in runs if r.data.tags.get("sweep.winner") == "true"]
    assert tagged.info.run_name == winner.name

    best = sweep("best", *data_args(data_dir, tiny_weights), stores=stores)
    assert best.exit_code == 0, output_of(best)
    assert re.search(rf"^Winner: {winner.name} ", best.output, re.M), output_of(best)
    listed = sweep("trials", stores=stores)
    assert starred(listed.output) == winner.name
