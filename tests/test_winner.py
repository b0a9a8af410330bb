"""`best`: the winner named, tagged, scored, exported and TTA'd, checked against the exported model run
here on the image files."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import optuna
import pytest
import torch
from click.testing import CliRunner
from sweep_helpers import mlflow_runs, sweep, trial_records

from clothing.checkpoint import load_model, spec_of
from clothing.data import ClothingDataset, build_transforms
from clothing.model import load_backbone
from clothing.scoring import model_from_checkpoint
from sweep.cli import cli
from sweep.tracking import Tracker


def images_and_labels(folder, classes):
    split = ClothingDataset(folder, build_transforms(), {c: i for i, c in enumerate(classes)})
    return torch.stack([split[i][0] for i in range(len(split))]), torch.tensor(split.labels)


def winner_run(swept):
    _, runs = mlflow_runs(swept.stores)
    (run,) = [r for r in runs if r.data.tags.get("sweep.winner") == "true"]
    return run


def accuracy(logits, labels) -> float:
    return (logits.argmax(1) == labels).sum().item() / len(labels)


def predicted_accuracy(model_file, folder, tmp_path, *options) -> float:
    """What `sweep predict MODEL FOLDER --output CSV` labels right, by each image's class folder."""
    out = tmp_path / f"{folder.name}.csv"
    result = CliRunner().invoke(cli, ["predict", str(model_file), str(folder), "--output", str(out), *options])
    assert result.exit_code == 0, result.output
    right = [row["label"] == Path(row["path"]).parent.name for row in csv.DictReader(out.open(encoding="utf-8"))]
    return sum(right) / len(right)


def test_test_acc_is_what_predict_gives_with_the_exported_file(swept, exported, tmp_path):
    result, model, payload = exported.result, exported.model, exported.payload
    test_acc = predicted_accuracy(exported.path, swept.data_dir / "test", tmp_path)
    assert winner_run(swept).data.metrics["best/test_acc"] == test_acc  # the same number, not one image off
    assert f"test_acc {test_acc:.3f}" in result.output
    val_x, val_y = images_and_labels(swept.data_dir / "validation", spec_of(payload).classes)
    with torch.no_grad():
        val_acc = accuracy(model(val_x), val_y)
    assert abs(test_acc - val_acc) >= 3 / len(val_y), "test and validation must score apart, or a swap goes unseen"


def test_tta_averages_each_image_with_its_mirror(swept, exported, tmp_path):
    result, model, payload = exported.result, exported.model, exported.payload
    x, y = images_and_labels(swept.data_dir / "validation", spec_of(payload).classes)
    with torch.no_grad():
        plain = accuracy(model(x), y)
        tta = accuracy((model(x) + model(x.flip(-1))) / 2, y)
    assert winner_run(swept).data.metrics["best/val_acc_tta"] == pytest.approx(tta, abs=1e-9)
    assert tta == predicted_accuracy(exported.path, swept.data_dir / "validation", tmp_path, "--tta")
    assert "with TTA (image + mirror)" in result.output
    # hat and pants are mirror images of each other, so the mirror changes predictions here.
    assert abs(tta - plain) >= 3 / len(y), "TTA must change the score here, or a TTA without the mirror goes unseen"


def test_the_export_predicts_what_the_sweep_recorded(swept, exported):
    model, payload = exported.model, exported.payload
    x, y = images_and_labels(swept.data_dir / "validation", spec_of(payload).classes)
    with torch.no_grad():
        assert accuracy(model(x), y) == pytest.approx(winner_run(swept).data.metrics["best/val_acc"], abs=1 / len(y))


def test_best_names_the_winner_tags_it_and_exports_an_equivalent_model(
    three_trials, stores, data_dir, tiny_weights, tmp_path
):
    out = tmp_path / "model.pt"
    result = sweep(
        "best",
        "--export",
        str(out),
        "--backbone-weights",
        str(tiny_weights),
        "--data-dir",
        str(data_dir),
        stores=stores,
    )
    assert result.exit_code == 0, result.output
    assert "Rule: among COMPLETE trials" in result.output and "Winner: trial" in result.output
    winner_name = result.output.split("Winner: ")[1].split()[0]

    payload = torch.load(out, weights_only=True)
    assert set(payload) == {"format_version", "kind", "spec", "state_dict", "train_config", "metrics", "provenance"}
    assert payload["provenance"]["trial"] == winner_name and payload["spec"]["classes"] == ("hat", "pants", "shoes")
    assert {"study", "mlflow_run_id", "backbone_fingerprint"} <= set(payload["provenance"])

    exported, _ = load_model(out)
    record = next(r for r in trial_records(stores) if r.name == winner_name)
    head = Tracker(stores["--tracking-uri"]).fetch_checkpoint(record)
    in_memory = model_from_checkpoint(head, load_backbone(tiny_weights))
    x = torch.randn(3, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(exported(x), in_memory(x))

    client, runs = mlflow_runs(stores)
    parent = next(r for r in runs if r.data.tags.get("sweep.role") == "study")
    assert parent.data.tags["sweep.winner_trial"] == winner_name
    assert client.get_run(record.run_id).data.tags["sweep.winner"] == "true"


def test_predict_prints_k_classes_per_image(three_trials, stores, data_dir, tiny_weights, tmp_path):
    out = tmp_path / "model.pt"
    assert sweep("best", "--export", str(out), "--backbone-weights", str(tiny_weights), stores=stores).exit_code == 0
    images = [str(data_dir / "validation" / "hat" / "00.jpg"), str(data_dir / "validation" / "shoes" / "01.jpg")]
    result = CliRunner().invoke(cli, ["predict", str(out), *images, "--top-k", "2"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert [lines[0], lines[3]] == images and len(lines) == 6
    assert all(line.split()[1] in ("hat", "pants", "shoes") for line in lines[1:3] + lines[4:6])


def test_best_on_a_missing_study_or_one_without_complete_trials_is_an_error(stores):
    nothing = sweep("best", "--study", "nope", stores=stores)
    assert nothing.exit_code == 1 and nothing.output.startswith("Error: no Optuna storage at ")
    database = stores["--storage"].removeprefix("sqlite:///")
    assert not os.path.exists(database)  # reading created nothing
    os.makedirs(os.path.dirname(database), exist_ok=True)
    study = optuna.create_study(study_name="empty", storage=stores["--storage"])
    missing = sweep("best", "--study", "nope", stores=stores)
    assert missing.exit_code == 1 and missing.output.startswith("Error: no study named 'nope'")
    study.tell(study.ask(), state=optuna.trial.TrialState.FAIL)
    empty = sweep("best", "--study", "empty", stores=stores)
    assert empty.exit_code == 1 and "no COMPLETE trial" in empty.output
