"""The terminal side: CLI conventions, and `make sweep` on a fresh folder fetching the data first."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
from click.testing import CliRunner

import clothing
from bench.images import make_split
from clothing.__main__ import cli as clothing_cli
from sweep.cli import cli

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("group,commands", [(cli, ["run", "best", "trials", "predict"]), (clothing_cli, ["classify"])])
def test_h_is_help_and_version_is_the_packages(group, commands):
    runner = CliRunner()
    short, long = runner.invoke(group, ["-h"]), runner.invoke(group, ["--help"])
    assert short.exit_code == 0 and short.output == long.output
    for command in commands:
        assert runner.invoke(group, [command, "-h"]).output == runner.invoke(group, [command, "--help"]).output
    listed = long.output.split("Commands:")[1]
    assert "..." not in listed and "…" not in listed, listed  # summaries short enough to show whole
    assert all(command in listed for command in commands)
    shown = runner.invoke(group, ["--version"])
    assert shown.exit_code == 0 and clothing.__version__ in shown.output
    assert version("clothing-sweep") == clothing.__version__  # the installed metadata reads the same


def git(*args, cwd):
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture
def dataset_repo(tmp_path):
    """A git repository laid out like the course's dataset, to clone from instead of GitHub."""
    repo = tmp_path / "origin"
    make_split(repo / "train", per_class=4)
    make_split(repo / "validation", per_class=2, seed=1000)
    git("init", "-q", cwd=repo)
    git("add", ".", cwd=repo)
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "data", cwd=repo)
    return repo


def make_sweep(tmp_path, tiny_weights, data_url):
    """`make sweep` as a fresh machine runs it, CLOTHING_DATA_DIR unset, every output in tmp_path."""
    env = {k: v for k, v in os.environ.items() if k not in ("CLOTHING_DATA_DIR", "MAKEFLAGS", "MFLAGS")}
    runs = tmp_path / "runs"
    env |= {
        "OPTUNA_STORAGE": f"sqlite:///{runs / 'optuna.db'}",
        "MLFLOW_TRACKING_URI": f"sqlite:///{runs / 'mlflow.db'}",
        "CLOTHING_CACHE_DIR": str(runs / "cache"),
        "CLOTHING_BACKBONE_WEIGHTS": str(tiny_weights),
    }
    variables = [
        f"DATA_URL={data_url}",
        f"DATA_DIR={tmp_path / 'data' / 'clothing-dataset-small'}",
        f"MODEL={tmp_path / 'model.pt'}",
        f"PY={sys.executable}",
        "SWEEP_OPTIONS=--trials 2 --epochs 1 --finetune-epochs 1 --quiet --precision fp32",
    ]
    # -o: the environment running the tests is installed already; never reinstall it from here.
    command = ["make", "--no-print-directory", "-C", str(ROOT), "-o", ".venv/.installed", "sweep", *variables]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.slow  # a real `make sweep`
@pytest.mark.skipif(shutil.which("git") is None or shutil.which("make") is None, reason="needs git and make")
def test_make_sweep_downloads_the_dataset_when_it_is_missing(tmp_path, tiny_weights, dataset_repo):
    result = make_sweep(tmp_path, tiny_weights, dataset_repo.as_uri())
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Downloading the clothing dataset" in result.stdout
    assert sorted(p.name for p in (tmp_path / "data" / "clothing-dataset-small" / "train").iterdir()) == [
        "hat",
        "pants",
        "shoes",
    ]
    assert (tmp_path / "model.pt").is_file() and "Winner: " in result.stdout


@pytest.mark.slow  # a real `make sweep`
@pytest.mark.skipif(shutil.which("git") is None or shutil.which("make") is None, reason="needs git and make")
def test_make_sweep_offline_fails_with_the_missing_data_error(tmp_path, tiny_weights):
    result = make_sweep(tmp_path, tiny_weights, (tmp_path / "unreachable").as_uri())
    assert result.returncode != 0
    (error,) = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert "does not exist" in error and "make data" in error and "CLOTHING_DATA_DIR" in error
    assert not (tmp_path / "runs").exists() and not (tmp_path / "model.pt").exists()
