"""The held-out fold of train/ (a sweep file's `holdout_fold`): stratified, the same for every run, every
image in exactly one fold, and never seen by a trial."""

import numpy as np
import pytest
import torch
import yaml
from sweep_helpers import PLAIN, data_args, load_study, mlflow_runs, sweep

from bench.images import make_split
from clothing.data import ClothingDataset, build_transforms
from clothing.features import cached_features
from clothing.model import load_backbone
from sweep.config import DataSettings
from sweep.data import HOLDOUT_TAG, fold_rows, load_splits, prepare_data


def test_the_folds_are_stratified_fixed_and_hold_out_every_image_once():
    labels = np.repeat([0, 1, 2, 3], [40, 20, 12, 1])  # unbalanced, and one class of a single image
    folds = [fold_rows(labels, fold) for fold in range(1, 6)]
    for kept, held in folds:
        assert sorted(np.concatenate([kept, held])) == list(range(len(labels)))  # a partition of the rows
        assert np.bincount(labels[held], minlength=4).tolist()[:2] == [8, 4]  # a fifth of each class
        assert np.bincount(labels[held], minlength=4)[2] in (2, 3) and 72 not in held  # the single image stays
    held_by_all = np.concatenate([held for _, held in folds])
    assert sorted(held_by_all) == list(range(72))  # every image but the single one, held out once
    again = fold_rows(labels, 2)
    assert all(np.array_equal(a, b) for a, b in zip(again, folds[1], strict=True))  # the same split every time
    # Shuffled, not taken in order: fold 1 is not the first fifth of each class.
    assert not np.array_equal(folds[0][1][:8], np.arange(8))
    with pytest.raises(ValueError, match="fold must be 1 to 5"):
        fold_rows(labels, 0)


def test_no_trial_trains_on_a_held_out_image(tmp_path, tiny_weights):
    data = tmp_path / "data"
    make_split(data / "train", per_class=10)
    make_split(data / "validation", per_class=2, seed=1000)
    settings = DataSettings(data, str(tiny_weights), tmp_path / "cache", 224, views=1, precision="fp32", holdout_fold=2)
    splits = load_splits(data, 224)
    prepared = prepare_data(settings, 1, torch.device("cpu"), splits, load_backbone(str(tiny_weights)), progress=False)

    # The cache holds every training image; the trials get all but the held-out ones.
    full = cached_features(
        ClothingDataset(data / "train", build_transforms()),
        load_backbone(str(tiny_weights)),
        tmp_path / "cache",
        precision="fp32",
        cut=17,
        progress=False,
    )
    kept, held = fold_rows(full.labels, 2)
    assert len(held) == 6 and sorted(prepared.train.keep) == sorted(full.keep[kept])
    assert not set(prepared.train.keep) & set(full.keep[held])
    assert prepared.train.features.shape[0] == len(kept) == prepared.train.activations().shape[0]
    for row, cache_row in enumerate(prepared.train.keep):
        assert prepared.train.features[row].equal(full.features[cache_row])  # the right rows, in order
    assert prepared.train.labels.tolist() == full.labels[kept].tolist()
    assert prepared.lineage.tags[HOLDOUT_TAG] == "6 of 30 training images (fold 2 of 5)"


def test_a_sweep_with_a_held_out_part_records_it_and_refuses_another(tmp_path, tiny_weights, stores):
    data = tmp_path / "data"
    make_split(data / "train", per_class=10)
    make_split(data / "validation", per_class=2, seed=1000)
    held_out = tmp_path / "held_out.yaml"
    held_out.write_text(yaml.safe_dump({**yaml.safe_load(open(PLAIN[1])), "holdout_fold": 1}))
    options = ["--config", held_out, *data_args(data, tiny_weights), "--trials", "2", "--epochs", "1", "--quiet"]
    result = sweep("run", *options, stores=stores)
    assert result.exit_code == 0, result.output
    _, runs = mlflow_runs(stores)
    trials = [r for r in runs if r.data.tags.get("sweep.role") == "trial"]
    assert len(trials) == 2 and {r.data.params["num_train"] for r in trials} == {"24"}  # 30 - 6 held out
    parent = next(r for r in runs if r.data.tags.get("sweep.role") == "study")
    assert parent.data.params["holdout_fold"] == "1"
    assert all(r.data.tags[HOLDOUT_TAG].startswith("6 of 30") for r in [parent, *trials])

    # Resuming with other held-out images would mix trials trained on different data: refused.
    held_out.write_text(yaml.safe_dump({**yaml.safe_load(open(PLAIN[1])), "holdout_fold": 2}))
    again = sweep("run", *options, "--trials", "3", stores=stores)
    assert again.exit_code == 1 and "held-out split" in again.output and "holdout" in again.output
    assert len(load_study(stores).trials) == 2
