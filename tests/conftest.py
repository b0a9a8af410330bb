"""Shared fixtures: tiny generated image folders, an informative backbone, real stores in tmp_path."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from click.testing import Result
from hypothesis import HealthCheck, settings
from mlflow import MlflowClient
from sweep_helpers import PLAIN, data_args, output_of, run_options, stores_copied, stores_in, sweep, trial_records

from bench.images import ALL_CLASSES, calibrated_backbone, make_split
from bench.servers import PostgresMissing
from clothing.checkpoint import load_model
from clothing.data import ClothingDataset, build_transforms
from sweep.ranking import select_winner


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """train/ with 4 images per class and validation/ with 2, three classes."""
    root = tmp_path / "data"
    make_split(root / "train", per_class=4)
    make_split(root / "validation", per_class=2, seed=1000)
    return root


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> Path:
    """A random MobileNetV2 with BatchNorm calibrated on styled images, saved as a state_dict: it stands
    in for the ImageNet weights, and its features tell the classes apart."""
    path = tmp_path_factory.mktemp("weights") / "mobilenet_v2_calibrated.pth"
    torch.save(calibrated_backbone().state_dict(), path)
    return path


@pytest.fixture(scope="session")
def empty_tracking_store(tmp_path_factory) -> Path:
    """An MLflow SQLite store with its tables made: creating them takes MLflow 2-3 s of migrations,
    so each test's `stores` starts from a copy of this one instead."""
    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def stores(tmp_path: Path, empty_tracking_store: Path) -> dict[str, str]:
    """Every piece of this test's run state in tmp_path/runs: a new Optuna storage, an empty MLflow store."""
    return stores_copied(tmp_path / "runs", empty_tracking_store)


@dataclass(frozen=True)
class Swept:
    """A finished sweep on informative tiny data: read it, don't add trials to it."""

    stores: dict[str, str]
    data_dir: Path
    weights: Path
    trials: int
    epochs: int


@pytest.fixture(scope="session")
def swept(tmp_path_factory, tiny_weights) -> Swept:
    """10 trials x 6 epochs with the median pruner, on 4 classes (12 train, 8 validation and 8 harder
    test images each). The fixture checks that the trials differ, so it can never decay into a sweep
    whose numbers are all the same (then every assertion on values would pass vacuously)."""
    root = tmp_path_factory.mktemp("swept")
    data = root / "data"
    make_split(data / "train", classes=ALL_CLASSES, per_class=12)
    make_split(data / "validation", classes=ALL_CLASSES, per_class=8, seed=50_000)
    make_split(data / "test", classes=ALL_CLASSES, per_class=8, seed=90_000, noise=45.0)
    # fp32 features: the same numbers on every CPU ("auto" picks bf16 where the CPU has it).
    options = ("--trials", "10", "--epochs", "6", "--precision", "fp32", "--quiet")
    result = sweep("run", *PLAIN, *data_args(data, tiny_weights), *options, stores=stores_in(root))
    assert result.exit_code == 0, result.output
    records = trial_records(stores_in(root))
    complete = [r for r in records if r.state == "COMPLETE"]
    assert len({r.val_acc for r in complete}) >= 3, "the trials should reach different accuracies"
    assert any(r.best_epoch > 1 for r in complete), "some trial should peak after epoch 1"
    assert any(r.state == "PRUNED" for r in records), "the median pruner should prune some trial"
    assert select_winner(records, 0.02).number != 0, "the winner should not be trial 0 by the tie-break"
    return Swept(stores_in(root), data, tiny_weights, trials=10, epochs=6)


@pytest.fixture
def train_set(data_dir) -> ClothingDataset:
    """The `data_dir` fixture's train/ split, with the evaluation transform."""
    return ClothingDataset(data_dir / "train", build_transforms())


@pytest.fixture
def three_trials(stores, data_dir, tiny_weights):
    """A small sweep of this test's own (3 trials x 2 epochs), which the test may add to."""
    result = sweep("run", *run_options(data_dir, tiny_weights, 3, 2), stores=stores)
    assert result.exit_code == 0, output_of(result)
    return result


@dataclass(frozen=True)
class Exported:
    result: Result  # what `best --tta --export` printed
    path: Path
    model: torch.nn.Module
    payload: dict


@pytest.fixture(scope="session")
def exported(swept, tmp_path_factory) -> Exported:
    """`best --tta --export` on the shared sweep, and the exported model (in eval mode), once per
    session: the rule's winner (a test that runs `best` under another tolerance restores the winner's
    tag afterwards: `winner_restored`)."""
    path = tmp_path_factory.mktemp("export") / "model.pt"
    result = sweep("best", "--tta", "--export", path, *data_args(swept.data_dir, swept.weights), stores=swept.stores)
    assert result.exit_code == 0, output_of(result)
    model, payload = load_model(path)
    return Exported(result, path, model.eval(), payload)


@pytest.fixture
def winner_restored(swept):
    """For a test that runs `best` on the shared sweep under another tolerance (which moves the winner's
    tag and the parent's summary): afterwards `best` under the study's own tolerance marks the rule's
    winner again, as the other readers of `swept` expect, whatever order the tests run in."""
    yield
    result = sweep("best", stores=swept.stores)
    assert result.exit_code == 0, output_of(result)


def pytest_configure(config):
    """Each pytest worker computes on its share of the cores, and so do the processes it starts
    (`make test` runs two workers on two cores): with every worker's OpenMP pool as wide as the
    machine, the pools oversubscribe the cores and spin waiting for each other. The tests not marked
    slow took 1.5x the time and 1.55x the CPU that way (docs/testing.md)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, torch.get_num_threads() // workers)))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_collection_modifyitems(items):
    """The slow tests first (the longest, the soak and Optuna's storage tests, at the very front): the
    two pytest workers then share them from the start, and the short tests fill the end instead of
    one long tail."""
    longest = ("test_soak.py", "test_optuna_storage.py")
    items.sort(key=lambda item: (item.path.name not in longest, item.get_closest_marker("slow") is None))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    try:
        return (yield)
    except PostgresMissing as exc:
        skip_or_fail(exc)


pytest_runtest_call = pytest_runtest_setup  # a test's own body, as its fixtures


def skip_or_fail(missing: PostgresMissing) -> None:
    """A test that needs PostgreSQL skips where its binaries are missing, saying how to install them;
    CI sets SWEEP_REQUIRE_POSTGRES, so there a missing install fails instead."""
    if os.environ.get("SWEEP_REQUIRE_POSTGRES"):
        pytest.fail(str(missing))
    pytest.skip(str(missing))


# Hypothesis: a few examples in `make test`; `pytest --hypothesis-profile long` for a
# long local run. The fuzz tests run real commands, so no deadline, and they make their own folders
# per example inside function-scoped fixtures.
settings.register_profile(
    "default",
    max_examples=5,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
settings.register_profile("long", settings.get_profile("default"), max_examples=100)
settings.load_profile("default")
