"""Helpers for driving the sweep CLI against real stores in tmp_path."""

from __future__ import annotations

import optuna
from click.testing import CliRunner
from mlflow import MlflowClient

from sweep.cli import cli


def with_stores(argv: list[str], stores: dict[str, str]) -> list[str]:
    """`argv` plus the options that keep every store in tmp_path."""
    return [*argv, *(item for pair in stores.items() for item in pair)]


def invoke(stores: dict[str, str], *args: str):
    """Run the CLI in this process on the given stores."""
    return CliRunner().invoke(cli, with_stores(list(args), stores))


def run_args(data_dir, weights, trials: int, epochs: int) -> list[str]:
    return [
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


def run_sweep_cli(stores, data_dir, weights, trials=3, epochs=2, *extra: str):
    return invoke(stores, "run", *run_args(data_dir, weights, trials, epochs), *extra)


def mlflow_runs(stores, study="clothing"):
    client = MlflowClient(tracking_uri=stores["--tracking-uri"])
    experiment = client.get_experiment_by_name(study)
    return client, client.search_runs([experiment.experiment_id]) if experiment else []


def load_study(stores, study="clothing") -> optuna.Study:
    return optuna.load_study(study_name=study, storage=stores["--storage"])
