"""`--image-size`: one size from the feature cache through stage 2 and the model file to `predict`."""

import functools
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from sweep_helpers import assert_one_error, mlflow_runs, output_of, run_options, sweep

from clothing.checkpoint import load_model, spec_of
from clothing.data import ClothingDataset, build_transforms
from clothing.features import cached_features
from clothing.inference import BatchOptions
from clothing.model import finetune_cut, load_backbone
from clothing.scoring import export_model, folder_accuracy, model_from_checkpoint
from sweep.cli import cli
from sweep.config import Stores
from sweep.study import read_studies
from sweep.tracking import Tracker

SIZE = 96  # not 224, and small enough for a tiny test; the backbone's stride 32 leaves 3x3 at the end


def test_a_larger_image_size_travels_from_the_features_to_predict(stores, data_dir, tiny_weights, tmp_path):
    options = (*run_options(data_dir, tiny_weights, 2, 1), "--image-size", SIZE, "--precision", "fp32")
    options += ("--views", "2", "--finetune-blocks", "1", "--finetune-epochs", "2")
    result = sweep("run", *options, stores=stores)
    assert result.exit_code == 0, output_of(result)

    # The cache: the activations entering the one fine-tuned block are those of 96 px images
    # (stride 32: 3x3, where 224 px gives 7x7), both views.
    cached = sorted(Path(stores["--cache-dir"]).glob(f"activations-*-cut{finetune_cut(1)}.npy"))
    shapes = sorted(np.load(p, mmap_mode="r").shape[1:] for p in cached)
    assert shapes == [(1, 160, 3, 3), (2, 160, 3, 3)]  # validation's plain view, train's two

    # Every trial of both stages records the size it saw.
    _, runs = mlflow_runs(stores)
    trials = [r for r in runs if r.data.tags.get("sweep.role") == "trial"]
    assert {r.data.tags.get("stage", "head") for r in trials} == {"head", "finetune"}
    assert {r.data.params["image_size"] for r in trials} == {str(SIZE)}
    parent = next(r for r in runs if r.data.tags.get("sweep.role") == "study")
    assert parent.data.params["image_size"] == str(SIZE)

    # The model file carries it: `best --export`'s, and the stage-2 trial's export, which, fed 96 px
    # images, gives the logits of the activations stage 2 cached, and so the val_acc it recorded.
    weights = ("--backbone-weights", tiny_weights)
    best = sweep("best", "--export", tmp_path / "best.pt", "--data-dir", data_dir, *weights, stores=stores)
    assert best.exit_code == 0, output_of(best)
    assert spec_of(load_model(tmp_path / "best.pt")[1]).image_size == SIZE
    (tuned,) = [r for r in read_studies(Stores(storage=stores["--storage"])).records() if r.stage == "finetune"]
    head, backbone = Tracker(stores["--tracking-uri"]).fetch_checkpoint(tuned), load_backbone(tiny_weights)
    model_file = export_model(head, model_from_checkpoint(head, backbone), tmp_path / "model.pt", {})
    model, payload = load_model(model_file)
    spec = spec_of(payload)
    assert spec.image_size == SIZE and spec.finetune_blocks == 1
    class_to_idx = {c: i for i, c in enumerate(spec.classes)}
    val_set = ClothingDataset(data_dir / "validation", build_transforms(SIZE), class_to_idx)
    images = torch.stack([val_set[i][0] for i in range(len(val_set))])
    assert images.shape[-2:] == (SIZE, SIZE)
    cache = functools.partial(cached_features, cache_dir=stores["--cache-dir"], cut=finetune_cut(1), image_size=SIZE)
    val = cache(val_set, backbone, precision="fp32", progress=False)
    assert val.cache_hit  # the sweep's own: validation is extracted in fp32
    with torch.no_grad():
        torch.testing.assert_close(model(images), model.tail()(val.activations()[:, 0].float()), rtol=1e-3, atol=1e-3)
    assert folder_accuracy(model, spec, data_dir / "validation", BatchOptions()) == pytest.approx(tuned.val_acc)

    # Mirror TTA over a split (`best --tta`, `predict --tta`) is the mean of the logits of each image and
    # of its mirror, flipped after resizing to the model's size, normalised as the model's training views were.
    with torch.no_grad():
        expected_tta = ((model(images) + model(images.flip(-1))).argmax(1) == val.labels).float().mean().item()
    val_dir = data_dir / "validation"
    assert folder_accuracy(model, spec, val_dir, BatchOptions(tta=True)) == pytest.approx(expected_tta)
    # Stage 2 trains on the same mirror, the training cache's view 1 at the cut.
    train_set = ClothingDataset(data_dir / "train", build_transforms(SIZE))
    train = cache(train_set, backbone, precision="fp32", views=2, progress=False)
    train_images = torch.stack([x for x, _ in train_set])
    with torch.no_grad():
        mirrored = model.tail()(train.activations()[:, 1].float())
        torch.testing.assert_close(mirrored, model(train_images.flip(-1)), rtol=1e-3, atol=1e-3)
    assert train.cache_hit  # the sweep's own cache, not a new one

    # predict resizes to the model's size: its probabilities are the model's on 96 px images.
    path = val_set.image_paths[0]
    predicted = CliRunner().invoke(cli, ["predict", str(model_file), path, "--top-k", "1"])
    assert predicted.exit_code == 0, predicted.output
    with torch.no_grad():
        probabilities = torch.softmax(model(images[:1]), dim=1)[0]
    top = int(probabilities.argmax())
    assert predicted.output.splitlines()[1:] == [f"  {probabilities[top]:6.3f}  {spec.classes[top]}"]


def test_a_study_resumes_only_at_the_size_it_was_run_with(stores, data_dir, tiny_weights):
    first = sweep("run", *run_options(data_dir, tiny_weights, 1, 1), "--image-size", SIZE, stores=stores)
    assert first.exit_code == 0, output_of(first)
    again = sweep("run", *run_options(data_dir, tiny_weights, 2, 1), stores=stores)  # 224, the default
    assert_one_error(again, "image_size", "--study NEW_NAME")
    assert len(read_studies(Stores(storage=stores["--storage"])).stage1.trials) == 1  # nothing added
