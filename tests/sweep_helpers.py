"""Driving the sweep CLI against real stores in tmp_path, with the command line on show."""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from pathlib import Path

import optuna
import yaml
from click.testing import CliRunner, Result
from mlflow import MlflowClient

from sweep.cli import cli
from sweep.config import Stores
from sweep.study import read_studies

# The commands that take fewer than all three store options.
STORE_OPTIONS = {"trials": ("--storage",), "best": ("--storage", "--tracking-uri")}
# The mission's head-only sweep (224 px, one view, no stage 2): what the tests run unless they say
# otherwise, as the recipe's stage 2 at 256 px would cost every test a fine-tuning.
SWEEPS = Path(__file__).resolve().parent.parent / "sweeps"
PLAIN = ("--config", str(SWEEPS / "plain.yaml"))
THOROUGH = SWEEPS / "thorough.yaml"


def stores_in(folder) -> dict[str, str]:
    """CLI options that put every piece of run state (Optuna, MLflow, cache) in `folder`."""
    return {
        "--storage": f"sqlite:///{folder / 'optuna.db'}",
        "--tracking-uri": f"sqlite:///{folder / 'mlflow.db'}",
        "--cache-dir": str(folder / "cache"),
    }


def stores_copied(folder: Path, template: Path) -> dict[str, str]:
    """`stores_in(folder)`, its MLflow store a copy of `template`, an empty store made once per session
    (creating one takes MLflow seconds of schema migrations)."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template, folder / "mlflow.db")
    return stores_in(folder)


def store_args(command: str, stores: dict[str, str]) -> list[str]:
    """The options that keep every store in tmp_path, as far as `command` takes them."""
    wanted = STORE_OPTIONS.get(command, tuple(stores))
    return [item for key, value in stores.items() if key in wanted for item in (key, value)]


def sweep(*argv, stores: dict[str, str] | None = None) -> Result:
    """`python -m sweep ARGV` (plus the store options), run in this process. The result's `command`
    is the line a user would type; `output_of(result)` shows it with the output on a failure."""
    args = [str(a) for a in argv] + (store_args(str(argv[0]), stores) if stores else [])
    result = CliRunner().invoke(cli, args)
    result.command = "python -m sweep " + shlex.join(args)
    return result


def output_of(result: Result) -> str:
    return f"$ {getattr(result, 'command', '?')}\n{result.output}"


def sweep_argv(*argv, stores: dict[str, str] | None = None) -> list[str]:
    """The same command line for a separate process (`python -m sweep ARGV` plus the store options)."""
    args = [str(a) for a in argv] + (store_args(str(argv[0]), stores) if stores else [])
    return [sys.executable, "-m", "sweep", *args]


def data_args(data_dir, weights) -> list[str]:
    return ["--data-dir", str(data_dir), "--backbone-weights", str(weights)]


def plain_file(folder, **changes) -> tuple[str, str]:
    """`--config FILE`: the plain sweep file with `changes` (settings, or a `space`) over it."""
    document = {**yaml.safe_load(Path(PLAIN[1]).read_text()), **changes}
    path = Path(folder) / "sweep.yaml"
    path.write_text(yaml.safe_dump(document))
    return ("--config", str(path))


def run_options(data_dir, weights, trials: int = 3, epochs: int = 2) -> list[str]:
    """The options of a quiet plain `run` on tiny data."""
    return [*PLAIN, *data_args(data_dir, weights), "--trials", trials, "--epochs", epochs, "--quiet"]


def mlflow_runs(stores, study="clothing"):
    client = MlflowClient(tracking_uri=stores["--tracking-uri"])
    experiment = client.get_experiment_by_name(study)
    return client, client.search_runs([experiment.experiment_id]) if experiment else []


def checkpoint_files(client: MlflowClient, run) -> list[str]:
    """The files of the one logged model the trial's run recorded its checkpoint as."""
    only_its = f"source_run_id = '{run.info.run_id}' AND model_type = 'checkpoint'"
    (model,) = client.search_logged_models([run.info.experiment_id], filter_string=only_its)
    return [a.path for a in client.list_logged_model_artifacts(model.model_id)]


def load_study(stores, study="clothing") -> optuna.Study:
    return optuna.load_study(study_name=study, storage=stores["--storage"])


def trial_records(stores, study="clothing"):
    """Both stages' trials of a study, as the winner rule sees them."""
    return read_studies(Stores(study, stores["--storage"])).records()


def assert_one_error(result, *fragments, code=1):
    """One `Error:` line holding every fragment, exit status `code`, and no traceback."""
    output = getattr(result, "output", None) or (result.stdout + result.stderr)
    exit_code = getattr(result, "exit_code", getattr(result, "returncode", None))
    assert exit_code == code, output
    error_lines = [line for line in output.splitlines() if line.startswith("Error:")]
    assert len(error_lines) == 1, output
    assert "Traceback" not in output
    for fragment in fragments:
        assert fragment in error_lines[0], error_lines[0]


def recorded(stores) -> tuple:
    """Everything a user has recorded in the stores: each study's trials with their states, each
    run with its status. Store files that do not exist record nothing."""
    storage, tracking = stores["--storage"], stores["--tracking-uri"]
    studies, runs = [], []
    if os.path.isfile(storage.removeprefix("sqlite:///")):
        for name in sorted(optuna.get_all_study_names(storage)):
            trials = optuna.load_study(study_name=name, storage=storage).trials
            studies.append((name, tuple((t.number, t.state.name) for t in trials)))
    if os.path.isfile(tracking.removeprefix("sqlite:///")):
        client = MlflowClient(tracking_uri=tracking)
        experiments = [e.experiment_id for e in client.search_experiments()]
        runs = sorted((r.info.run_id, r.info.status) for r in client.search_runs(experiments))
    return tuple(studies), tuple(runs)


def assert_clean_outcome(result) -> None:
    """What any input may lead to: success, a click usage error, or exactly one `Error:` line with a
    non-zero exit; never a traceback."""
    assert result.exception is None or isinstance(result.exception, SystemExit), output_of(result)
    assert "Traceback" not in result.output, output_of(result)
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert result.exit_code in (0, 1, 2), output_of(result)
    assert len(errors) == (0 if result.exit_code == 0 else 1), output_of(result)
