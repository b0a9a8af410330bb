"""Each bad input: one `Error:` line naming the problem, a non-zero exit, no traceback, stores intact."""

import os
import pickle
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from sweep_helpers import assert_one_error, load_study, mlflow_runs, run_options, stores_copied, sweep
from torchvision import models

from bench.images import make_split, write_image
from sweep.cli import cli


def snapshot(stores):
    """What a user has recorded: trials with their states, runs with their statuses."""
    study = load_study(stores)
    _, runs = mlflow_runs(stores)
    return (
        sorted((t.number, t.state.name) for t in study.trials),
        sorted((r.info.run_id, r.info.status) for r in runs),
    )


@pytest.fixture(scope="module")
def one_trial_study(tmp_path_factory, tiny_weights, empty_tracking_store) -> Path:
    """The stores of a study with one finished trial, swept once for the module's many mistakes."""
    root = tmp_path_factory.mktemp("one-trial")
    make_split(root / "data" / "train", per_class=4)
    make_split(root / "data" / "validation", per_class=2, seed=1000)
    stores = stores_copied(root / "runs", empty_tracking_store)
    assert sweep("run", *run_options(root / "data", tiny_weights, 1, 1), stores=stores).exit_code == 0
    return root / "runs"


@pytest.fixture
def existing(one_trial_study, stores):
    """A study with one finished trial, as a user would have before making a mistake: a copy of
    `one_trial_study` in this test's stores (its runs' artifacts stay in the module's folder)."""
    shutil.copytree(one_trial_study, Path(stores["--cache-dir"]).parent, dirs_exist_ok=True)
    return snapshot(stores)


def break_data(data_dir, case):
    hat = data_dir / "train" / "hat"
    if case == "missing data dir":
        shutil.rmtree(data_dir)
    elif case == "train without class folders":
        shutil.rmtree(data_dir / "train")
        (data_dir / "train").mkdir()
    elif case == "class folder without images":
        for image in hat.iterdir():
            image.unlink()
    elif case == "zero-byte jpeg":
        (hat / "00.jpg").write_bytes(b"")
    elif case == "truncated jpeg":
        write_image(hat / "00.jpg", size=200)
        (hat / "00.jpg").write_bytes((hat / "00.jpg").read_bytes()[:600])
    elif case == "text named .jpg":
        (hat / "00.jpg").write_text("just some text")
    elif case == "validation class that train lacks":
        make_split(data_dir / "validation", classes=("socks",), per_class=1)


BAD_DATA = {
    "missing data dir": ("does not exist", "make data", "--data-dir", "CLOTHING_DATA_DIR"),
    "train without class folders": ("has no class folders",),
    "class folder without images": ("hat has no images",),
    "zero-byte jpeg": ("unreadable image", "00.jpg", "--skip-bad-images"),
    "truncated jpeg": ("unreadable image", "00.jpg"),
    "text named .jpg": ("unreadable image", "00.jpg"),
    "validation class that train lacks": ("socks", "training split does not have"),
}


@pytest.mark.parametrize("case", BAD_DATA)
def test_bad_data_is_one_clear_error_and_loses_nothing(case, existing, stores, data_dir, tiny_weights):
    break_data(data_dir, case)
    assert_one_error(sweep("run", *run_options(data_dir, tiny_weights, 2, 1), stores=stores), *BAD_DATA[case])
    assert snapshot(stores) == existing


@pytest.mark.parametrize(
    "options,fragment",
    [
        (["--trials", "0"], "--trials"),
        (["--epochs", "-1"], "--epochs"),
        (["--device", "tpu"], "--device"),
        (["--views", "0"], "--views"),
        (["--finetune-blocks", "18"], "--finetune-blocks"),
        (["--finetune-lr", "0"], "--finetune-lr"),
    ],
)
def test_bad_options_are_usage_errors(options, fragment, existing, stores, data_dir, tiny_weights):
    result = sweep("run", *run_options(data_dir, tiny_weights, 2, 1), *options, stores=stores)
    assert_one_error(result, fragment, code=2)
    assert snapshot(stores) == existing


def test_an_unreachable_tracking_server_fails_before_any_work(existing, stores, data_dir, tiny_weights, tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cache = tmp_path / "fresh-cache"
    result = sweep(
        "run",
        *run_options(data_dir, tiny_weights, 2, 1),
        stores={**stores, "--tracking-uri": f"http://127.0.0.1:{port}", "--cache-dir": str(cache)},
    )
    assert_one_error(result, "cannot reach the MLflow tracking store", f"127.0.0.1:{port}")
    assert not cache.exists()  # no features were extracted, no trial started
    assert snapshot(stores) == existing


def test_skip_bad_images_leaves_them_out_and_lists_them(stores, data_dir, tiny_weights):
    (data_dir / "train" / "hat" / "00.jpg").write_bytes(b"")
    result = sweep("run", *run_options(data_dir, tiny_weights, 2, 1), "--skip-bad-images", stores=stores)
    assert result.exit_code == 0, result.output
    client, runs = mlflow_runs(stores)
    parent = next(r for r in runs if r.data.tags.get("sweep.role") == "study")
    listed = client.download_artifacts(parent.info.run_id, "skipped_images.txt", str(data_dir.parent))
    assert open(listed).read().strip() == str(data_dir / "train" / "hat" / "00.jpg")


def test_export_into_a_missing_or_unwritable_folder(existing, stores, tiny_weights, tmp_path):
    missing = sweep(
        "best", "--export", str(tmp_path / "nope" / "model.pt"), "--backbone-weights", str(tiny_weights), stores=stores
    )
    assert_one_error(missing, "does not exist")
    if os.geteuid() == 0:  # root writes through permission bits; /proc refuses new files to anyone
        unwritable = "/proc/model.pt"
    else:
        folder = tmp_path / "read-only"
        folder.mkdir(mode=0o555)
        unwritable = str(folder / "model.pt")
    result = sweep("best", "--export", unwritable, "--backbone-weights", str(tiny_weights), stores=stores)
    assert_one_error(result, "cannot write", "writable folder")
    assert not os.path.exists(unwritable)
    assert snapshot(stores) == existing


class RunsCode:
    def __reduce__(self):
        return (os.system, ("touch /tmp/clothing-sweep-pwned",))


@pytest.mark.parametrize("kind", ["text", "pickle", "torch-pickle", "state_dict"])
def test_predict_refuses_files_that_are_not_exported_models(kind, tmp_path, data_dir):
    path = tmp_path / "model.pt"
    if kind == "text":
        path.write_text("hello")
    elif kind == "pickle":
        path.write_bytes(pickle.dumps(RunsCode()))
    elif kind == "torch-pickle":
        torch.save({"x": RunsCode()}, path)
    else:
        torch.save({"weight": torch.zeros(2)}, path)
    if os.path.exists("/tmp/clothing-sweep-pwned"):
        os.remove("/tmp/clothing-sweep-pwned")
    result = CliRunner().invoke(cli, ["predict", str(path), str(data_dir / "train" / "hat" / "00.jpg")])
    assert_one_error(result, str(path), "not a clothing model")
    assert not os.path.exists("/tmp/clothing-sweep-pwned")


def test_best_on_an_empty_study(stores):
    import optuna

    os.makedirs(os.path.dirname(stores["--storage"].removeprefix("sqlite:///")), exist_ok=True)
    optuna.create_study(study_name="clothing", storage=stores["--storage"])
    assert_one_error(sweep("best", stores=stores), "no COMPLETE trial")


def test_best_with_other_backbone_weights_is_refused(existing, stores, data_dir, tmp_path):
    torch.manual_seed(123)
    other = tmp_path / "other.pth"
    torch.save(models.mobilenet_v2(weights=None).state_dict(), other)
    result = sweep("best", "--tta", "--backbone-weights", str(other), "--data-dir", str(data_dir), stores=stores)
    assert_one_error(result, "other backbone weights", "--backbone-weights")


class CreatesFile:
    """Unpickling this creates `marker`: a weights file must be loaded without ever running it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_backbone_weights_file_that_runs_code_is_refused_without_running_it(stores, data_dir, tmp_path):
    marker, evil = tmp_path / "pwned", tmp_path / "evil.pth"
    torch.save({"features.0.0.weight": CreatesFile(marker)}, evil)
    assert_one_error(
        sweep("run", *run_options(data_dir, evil, 2, 1), stores=stores),
        str(evil),
        "not a torchvision MobileNetV2 state_dict",
    )
    assert not marker.exists()


@pytest.fixture
def fresh_folder(tmp_path, monkeypatch):
    """A project folder on a fresh machine: no data, no stores, none of our variables set."""
    for name in ("CLOTHING_DATA_DIR", "OPTUNA_STORAGE", "MLFLOW_TRACKING_URI", "CLOTHING_CACHE_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_run_without_data_says_how_to_get_it_and_creates_no_store(fresh_folder, tiny_weights):
    result = CliRunner().invoke(cli, ["run", "--backbone-weights", str(tiny_weights)])
    assert_one_error(result, "data/clothing-dataset-small/train does not exist", "make data", "CLOTHING_DATA_DIR")
    assert list(fresh_folder.iterdir()) == []  # no mlruns/, no empty study for `trials` to show


def offline_env(tmp_path) -> dict:
    """No network: every download goes through a proxy on a port nothing listens on (urllib, which
    torch.hub uses, reads https_proxy), into an empty torch cache."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proxy = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k.lower() != "no_proxy"}
    return {**env, "https_proxy": proxy, "HTTPS_PROXY": proxy, "TORCH_HOME": str(tmp_path / "torch-home")}


@pytest.mark.parametrize("command", ["sweep run", "clothing classify"])
def test_offline_without_weights_is_one_error_naming_the_weights_variable(command, fresh_folder, data_dir):
    args = {
        "sweep run": ["sweep", "run", "--data-dir", str(data_dir)],
        "clothing classify": ["clothing", "classify", str(data_dir / "train" / "hat" / "00.jpg")],
    }[command]
    env = offline_env(fresh_folder)
    env.pop("CLOTHING_BACKBONE_WEIGHTS", None)  # the default: torchvision's download
    result = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=env, timeout=300)
    assert_one_error(result, "cannot download", "CLOTHING_BACKBONE_WEIGHTS", "--backbone-weights", "once")
    assert len(result.stderr.splitlines()) <= 2, result.stderr  # torch's "Downloading: ..." line, then ours
    assert not (fresh_folder / "mlruns").exists()
