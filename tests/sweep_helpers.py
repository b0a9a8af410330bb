"""Helpers for driving the sweep CLI against real stores in tmp_path."""

from __future__ import annotations

import optuna
from click.testing import CliRunner
from mlflow import MlflowClient

from sweep.cli import cli


def run_sweep_cli(stores, data_dir, weights, trials=3, epochs=2, study="clothing"):
    argv = [
        "run",
        "--study",
        study,
        "--data-dir",
        str(data_dir),
        "--backbone-weights",
        str(weights),
        "--trials",
        str(trials),
        "--epochs",
        str(epochs),
        "--quiet",
    ]
    for key, value in stores.items():
        argv += [key, value]
    return CliRunner().invoke(cli, argv)


def mlflow_runs(stores, study="clothing"):
    client = MlflowClient(tracking_uri=stores["--tracking-uri"])
    experiment = client.get_experiment_by_name(study)
    return client, client.search_runs([experiment.experiment_id]) if experiment else []


def load_study(stores, study="clothing") -> optuna.Study:
    return optuna.load_study(study_name=study, storage=stores["--storage"])
