"""Every run traceable to its data and code: dataset inputs with digests, the git commit, package
versions, the feature-cache keys; and MLflow's system metrics on the parent run."""

from __future__ import annotations

import json
import subprocess
from importlib.metadata import version
from pathlib import Path

from sweep_helpers import mlflow_runs, run_options, sweep

from bench.images import make_split

ROOT = Path(__file__).resolve().parent.parent


def inputs_of(run) -> dict[str, tuple[str, dict, str]]:
    return {
        d.dataset.name: (d.dataset.digest, json.loads(d.dataset.profile), d.tags[0].value)
        for d in run.inputs.dataset_inputs
    }


def test_every_run_records_its_splits_code_and_cached_features(stores, data_dir, tiny_weights):
    assert sweep("run", *run_options(data_dir, tiny_weights, 2, 1), stores=stores).exit_code == 0
    _, runs = mlflow_runs(stores)
    assert len(runs) == 3
    for run in runs:  # the parent and both trials
        splits = inputs_of(run)
        assert set(splits) == {"train", "validation"}
        assert splits["train"][1] == {"images": 12, "classes": {"hat": 4, "pants": 4, "shoes": 4}}
        assert splits["validation"][1]["images"] == 6
        assert (splits["train"][2], splits["validation"][2]) == ("training", "validation")
        tags = run.data.tags
        assert tags["sweep.version.torch"] == version("torch") and tags["sweep.version.mlflow"] == version("mlflow")
        assert tags["sweep.version.optuna"] == version("optuna")
        cache_files = {p.name for p in Path(stores["--cache-dir"]).iterdir()}
        assert f"features-{tags['sweep.feature_cache.train']}.npy" in cache_files
        assert f"features-{tags['sweep.feature_cache.validation']}.npy" in cache_files
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
        if head.returncode == 0:  # run from a checkout (as in CI): its commit, and whether it had changes
            assert tags["mlflow.source.git.commit"] == head.stdout.strip()
            assert tags["sweep.git.dirty"] in ("true", "false")
        else:
            assert "mlflow.source.git.commit" not in tags


def test_a_splits_digest_changes_when_a_file_changes(stores, data_dir, tiny_weights):
    assert sweep("run", *run_options(data_dir, tiny_weights, 1, 1), stores=stores).exit_code == 0
    image = data_dir / "train" / "hat" / "00.jpg"
    image.write_bytes(image.read_bytes() + b"\0" * 16)  # still a readable JPEG, now 16 bytes longer
    options = run_options(data_dir, tiny_weights, 1, 1)
    assert sweep("run", "--study", "changed", *options, stores=stores).exit_code == 0
    (first,), (second,) = ([r for r in mlflow_runs(stores, s)[1] if r.data.tags["sweep.role"] == "study"] for s in
                           ("clothing", "changed"))  # fmt: skip
    before, after = inputs_of(first), inputs_of(second)
    assert before["train"][0] != after["train"][0]
    assert before["validation"][0] == after["validation"][0]


def test_a_test_split_is_recorded_as_testing(stores, data_dir, tiny_weights):
    make_split(data_dir / "test", per_class=1, seed=5000)
    assert sweep("run", *run_options(data_dir, tiny_weights, 1, 1), stores=stores).exit_code == 0
    parent = next(r for r in mlflow_runs(stores)[1] if r.data.tags["sweep.role"] == "study")
    assert inputs_of(parent)["test"][1]["images"] == 3 and inputs_of(parent)["test"][2] == "testing"


def test_system_metrics_are_logged_on_the_parent_run_unless_switched_off(monkeypatch, stores, data_dir, tiny_weights):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    assert sweep("run", *run_options(data_dir, tiny_weights, 3, 2), stores=stores).exit_code == 0
    parent = next(r for r in mlflow_runs(stores)[1] if r.data.tags["sweep.role"] == "study")
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(parent.data.metrics)

    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")  # MLflow's own switch
    off = sweep("run", "--study", "quiet", *run_options(data_dir, tiny_weights, 3, 2), stores=stores)
    assert off.exit_code == 0
    parent = next(r for r in mlflow_runs(stores, "quiet")[1] if r.data.tags["sweep.role"] == "study")
    assert not any(k.startswith("system/") for k in parent.data.metrics)
