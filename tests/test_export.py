"""`best` scores, exports and TTA, checked against the exported model run here on the image files."""

from __future__ import annotations

import pytest
import torch
from conftest import data_args
from sweep_helpers import mlflow_runs, output_of, sweep

from clothing.checkpoint import load_model
from clothing.data import ClothingDataset, build_transforms


def images_and_labels(folder, classes):
    split = ClothingDataset(folder, build_transforms(), {c: i for i, c in enumerate(classes)})
    return torch.stack([split[i][0] for i in range(len(split))]), torch.tensor(split.labels)


def winner_run(swept):
    _, runs = mlflow_runs(swept.stores)
    (run,) = [r for r in runs if r.data.tags.get("sweep.winner") == "true"]
    return run


@pytest.fixture(scope="module")
def exported(swept, tmp_path_factory):
    """`best --tta --export` on the shared sweep, and the exported model."""
    path = tmp_path_factory.mktemp("export") / "model.pt"
    result = sweep("best", "--tta", "--export", path, *data_args(swept.data_dir, swept.weights), stores=swept.stores)
    assert result.exit_code == 0, output_of(result)
    model, payload = load_model(path)
    return result, model.eval(), payload


def accuracy(logits, labels) -> float:
    return (logits.argmax(1) == labels).sum().item() / len(labels)


def test_test_acc_is_the_exported_models_accuracy_on_the_test_split(swept, exported):
    result, model, payload = exported
    test_x, test_y = images_and_labels(swept.data_dir / "test", payload["classes"])
    val_x, val_y = images_and_labels(swept.data_dir / "validation", payload["classes"])
    with torch.no_grad():
        test_acc, val_acc = accuracy(model(test_x), test_y), accuracy(model(val_x), val_y)
    # Within one image: the sweep scores on cached features (a fused graph), this on the images.
    assert winner_run(swept).data.metrics["test_acc"] == pytest.approx(test_acc, abs=1 / len(test_y) + 1e-9)
    assert "test_acc " in result.output
    assert abs(test_acc - val_acc) >= 3 / len(val_y), "test and validation must score apart, or a swap goes unseen"


def test_tta_averages_each_image_with_its_mirror(swept, exported):
    result, model, payload = exported
    x, y = images_and_labels(swept.data_dir / "validation", payload["classes"])
    with torch.no_grad():
        plain = accuracy(model(x), y)
        tta = accuracy((model(x) + model(x.flip(-1))) / 2, y)
    assert winner_run(swept).data.metrics["val_acc_tta"] == pytest.approx(tta, abs=1 / len(y) + 1e-9)
    assert "with TTA (image + mirror)" in result.output
    # hat and pants are mirror images of each other, so the mirror changes predictions here.
    assert abs(tta - plain) >= 3 / len(y), "TTA must change the score here, or a TTA without the mirror goes unseen"


def test_the_export_predicts_what_the_sweep_recorded(swept, exported):
    _, model, payload = exported
    x, y = images_and_labels(swept.data_dir / "validation", payload["classes"])
    with torch.no_grad():
        assert accuracy(model(x), y) == pytest.approx(winner_run(swept).data.metrics["best_val_acc"], abs=1 / len(y))
