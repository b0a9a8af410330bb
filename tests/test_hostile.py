"""Hostile inputs as classes: unreadable images of every kind, names that are not UTF-8, numbers
that parse but make no sense, data that cannot make a classifier. The listed cases first, then
Hypothesis-generated ones (`pytest --hypothesis-profile long` runs many more)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st
from sweep_helpers import (
    PLAIN,
    assert_clean_outcome,
    assert_one_error,
    mlflow_runs,
    recorded,
    run_options,
    stores_copied,
    stores_in,
    sweep,
)

from bench.images import HOSTILE_KINDS, UNREADABLE_KINDS, make_split, write_bomb_png, write_hostile_file
from clothing.__main__ import cli as clothing_cli
from clothing.data import shown
from sweep.cli import cli

pytestmark = pytest.mark.slow

NOT_UTF8 = os.fsdecode(b"caf\xe9-\xff")  # a Latin-1 name, as old archives unzip on Linux


def fresh_folder(tmp_path: Path) -> Path:
    """A folder of its own for one Hypothesis example."""
    return Path(tempfile.mkdtemp(dir=tmp_path))


# The listed cases ---------------------------------------------------------------------------------


def test_a_decompression_bomb_is_an_unreadable_image_everywhere(data_dir, tiny_weights, stores, exported):
    bomb = write_bomb_png(data_dir / "train" / "hat" / "bomb.png")
    assert bomb.stat().st_size < 1000
    refused = sweep("run", *run_options(data_dir, tiny_weights, 1, 1), stores=stores)
    assert_one_error(refused, "1 unreadable image(s)", str(bomb), "--skip-bad-images")
    assert recorded(stores) == ((), ())  # no study, no run

    skipped = sweep("run", *run_options(data_dir, tiny_weights, 1, 1), "--skip-bad-images", stores=stores)
    assert skipped.exit_code == 0, skipped.output
    client, runs = mlflow_runs(stores)
    parent = next(r for r in runs if r.data.tags.get("sweep.role") == "study")
    listed = client.download_artifacts(parent.info.run_id, "skipped_images.txt")
    assert Path(listed).read_text().splitlines() == [str(bomb)]

    good = next((data_dir / "validation" / "hat").iterdir())
    predicted = CliRunner().invoke(cli, ["predict", str(exported.path), str(good), str(bomb)])
    assert_one_error(predicted, f"cannot read image {bomb}", "DecompressionBombError")
    assert predicted.output.splitlines()[0] == str(good)  # the readable image is still predicted
    classified = CliRunner().invoke(clothing_cli, ["classify", str(bomb), "--backbone-weights", str(tiny_weights)])
    assert_one_error(classified, "DecompressionBombError")


def test_names_that_are_not_utf8_work_end_to_end(tmp_path, tiny_weights, exported):
    data = tmp_path / NOT_UTF8
    make_split(data / "train", per_class=4)
    make_split(data / "validation", per_class=2, seed=1000)
    (data / "train" / "hat" / "00.jpg").rename(data / "train" / "hat" / f"{NOT_UTF8}.jpg")
    write_hostile_file(data / "train" / "pants" / f"{NOT_UTF8}-broken.jpg", "random bytes")
    stores = {**stores_in(tmp_path / "runs"), "--cache-dir": str(tmp_path / f"{NOT_UTF8}-cache")}
    result = sweep("run", *run_options(data, tiny_weights, 1, 1), "--skip-bad-images", stores=stores)
    assert result.exit_code == 0, result.output
    client, runs = mlflow_runs(stores)
    parent = next(r for r in runs if r.data.tags.get("sweep.role") == "study")
    assert parent.data.params["data_dir"] == shown(data) and "\\xff" in parent.data.params["data_dir"]
    listed = Path(client.download_artifacts(parent.info.run_id, "skipped_images.txt")).read_text()
    assert listed.strip() == shown(data / "train" / "pants" / f"{NOT_UTF8}-broken.jpg")
    assert sweep("trials", stores=stores).exit_code == 0

    image = data / "train" / "hat" / f"{NOT_UTF8}.jpg"
    predicted = CliRunner().invoke(cli, ["predict", str(exported.path), str(image)])
    assert predicted.exit_code == 0, predicted.output
    assert predicted.output.splitlines()[0] == shown(image)


def test_a_store_in_a_folder_that_is_not_utf8_is_refused_in_one_line(data_dir, tiny_weights, tmp_path):
    stores = stores_in(tmp_path / NOT_UTF8)
    result = sweep("run", *run_options(data_dir, tiny_weights, 1, 1), stores=stores)
    assert_one_error(result, "is not valid UTF-8", "\\xff")


@pytest.mark.parametrize(
    "command, option, value",
    [
        ("run", "--finetune-lr", "nan"),
        ("run", "--finetune-lr", "inf"),
        ("run", "--seed", "-1"),
        ("best", "--tolerance", "nan"),
        ("trials", "--tolerance", "inf"),
        ("run", "--epochs", "100000"),
    ],
)
def test_numbers_that_parse_but_make_no_sense_are_usage_errors(command, option, value, data_dir, tiny_weights, stores):
    argv = run_options(data_dir, tiny_weights, 1, 1) if command == "run" else []
    result = sweep(command, *argv, option, value, stores=stores)
    assert_one_error(result, option, code=2)
    assert recorded(stores) == ((), ())  # refused before anything ran


def test_data_with_one_class_is_refused_before_any_store_exists(tmp_path, tiny_weights):
    data = tmp_path / "data"
    make_split(data / "train", classes=("hat",), per_class=4)
    make_split(data / "validation", classes=("hat",), per_class=2)
    stores = stores_in(tmp_path / "runs")
    result = sweep("run", *run_options(data, tiny_weights, 1, 1), stores=stores)
    assert_one_error(result, "has one class folder (hat)", "at least two")
    assert not (tmp_path / "runs").exists()


# Generated cases ----------------------------------------------------------------------------------

ODD_NUMBERS = st.one_of(
    st.sampled_from(["nan", "-nan", "inf", "-inf", "-1", "0", "1e308", "1e-320", "9" * 30, "0x10", "", " 3", "1_0"]),
    st.integers().map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(max_size=6),
)
RUN_NUMBERS = (
    "--trials",
    "--epochs",
    "--seed",
    "--jobs",
    "--views",
    "--finetune-blocks",
    "--finetune-epochs",
    "--finetune-lr",
)


@given(option=st.sampled_from(RUN_NUMBERS), value=ODD_NUMBERS)
def test_any_number_given_to_run_is_accepted_or_refused_in_one_line(option, value, tmp_path, tiny_weights):
    """With the data folder missing, an accepted number ends at that one error; nothing is created."""
    root = fresh_folder(tmp_path)
    runs = root / "runs"
    result = sweep("run", "--data-dir", root / "missing", "--backbone-weights", tiny_weights, option, value,
                   stores=stores_in(runs))  # fmt: skip
    assert_clean_outcome(result)
    assert not runs.exists()


@given(tolerance=ODD_NUMBERS, top_k=ODD_NUMBERS)
def test_any_number_given_to_trials_and_predict_is_accepted_or_refused_in_one_line(tolerance, top_k, swept, exported):
    before = recorded(swept.stores)
    assert_clean_outcome(sweep("trials", "--tolerance", tolerance, stores=swept.stores))
    image = next((swept.data_dir / "validation" / "hat").iterdir())
    assert_clean_outcome(CliRunner().invoke(cli, ["predict", str(exported.path), str(image), "--top-k", top_k]))
    assert recorded(swept.stores) == before


PATH_KINDS = ("missing", "a file", "a folder", "not utf-8", "not utf-8, existing", "very long", "odd characters")


def odd_path(root: Path, kind: str, data: Path) -> Path:
    """A path of `kind`; "not utf-8, existing" is a copy of the data under a non-UTF-8 name."""
    if kind == "missing":
        return root / "no" / "such"
    if kind == "a file":
        (root / "a-file").write_text("x")
        return root / "a-file"
    if kind == "a folder":
        (root / "a-folder").mkdir(exist_ok=True)
        return root / "a-folder"
    if kind == "not utf-8":
        return root / NOT_UTF8
    if kind == "not utf-8, existing":
        return Path(shutil.copytree(data, root / f"{NOT_UTF8}-data", dirs_exist_ok=True))
    if kind == "very long":
        return root / ("x" * 300)
    return root / "a b\nc;$(echo)'\""


@given(option=st.sampled_from(["--data-dir", "--cache-dir", "--backbone-weights"]), kind=st.sampled_from(PATH_KINDS))
def test_any_path_given_to_run_works_or_is_refused_in_one_line(
    option, kind, tmp_path, data_dir, tiny_weights, empty_tracking_store
):
    root = fresh_folder(tmp_path)
    stores = stores_copied(root / "runs", empty_tracking_store)
    options = {"--data-dir": data_dir, "--cache-dir": root / "cache", "--backbone-weights": tiny_weights}
    options[option] = odd_path(root, kind, data_dir)
    argv = [item for pair in options.items() for item in pair]
    result = sweep("run", *PLAIN, *argv, "--trials", 1, "--epochs", 1, "--quiet", *stores_options(stores))
    assert_clean_outcome(result)
    if result.exit_code != 0:
        assert recorded(stores) == ((), ())


def stores_options(stores: dict[str, str]) -> list[str]:
    return ["--storage", stores["--storage"], "--tracking-uri", stores["--tracking-uri"]]


@given(kind=st.sampled_from(PATH_KINDS), which=st.sampled_from(["model", "image", "export"]))
def test_any_path_given_to_predict_or_best_works_or_is_refused_in_one_line(kind, which, tmp_path, swept, exported):
    root = fresh_folder(tmp_path)
    path = odd_path(root, kind, swept.data_dir)
    image = next((swept.data_dir / "validation" / "hat").iterdir())
    if which == "export":
        before = recorded(swept.stores)
        result = sweep("best", "--export", path, "--backbone-weights", swept.weights, stores=swept.stores)
        assert recorded(swept.stores)[0] == before[0]  # `best` may tag runs, never changes a trial
    else:
        argv = [path, image] if which == "model" else [exported, path]
        result = CliRunner().invoke(cli, ["predict", *map(str, argv)])
    assert_clean_outcome(result)


@given(
    kinds=st.lists(st.sampled_from(HOSTILE_KINDS), min_size=1, max_size=3),
    names=st.lists(st.sampled_from(["a.jpg", "b.png", f"{NOT_UTF8}.jpg", "c.JPEG"]), min_size=3, max_size=3),
    skip=st.booleans(),
)
def test_any_file_in_an_image_folder_is_an_image_or_unreadable(
    kinds, names, skip, tmp_path, tiny_weights, exported, empty_tracking_store
):
    root = fresh_folder(tmp_path)
    data = root / "data"
    make_split(data / "train", per_class=3)
    make_split(data / "validation", per_class=2, seed=1000)
    files = [
        write_hostile_file(data / "train" / "hat" / f"hostile-{i}-{name}", kind, seed=i)
        for i, (kind, name) in enumerate(zip(kinds, names))
    ]
    unreadable = [path for path, kind in zip(files, kinds) if kind in UNREADABLE_KINDS]
    stores = stores_copied(root / "runs", empty_tracking_store)
    result = sweep("run", *run_options(data, tiny_weights, 1, 1), *(["--skip-bad-images"] if skip else []),
                   stores=stores)  # fmt: skip
    assert_clean_outcome(result)
    if unreadable and not skip:
        assert_one_error(result, f"{len(unreadable)} unreadable image(s)", *(shown(p) for p in unreadable[:5]))
        assert recorded(stores) == ((), ())
    else:
        assert result.exit_code == 0
        studies, _ = recorded(stores)
        assert [name for name, _ in studies] == ["clothing"]

    good = next((data / "validation" / "pants").iterdir())
    predicted = CliRunner().invoke(cli, ["predict", str(exported.path), str(good), *map(str, files)])
    assert_clean_outcome(predicted)
    assert predicted.exit_code == (1 if unreadable else 0)
    assert predicted.output.splitlines()[0] == str(good)
