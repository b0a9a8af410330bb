"""Stage 1's trials, checked on values: what each run logs is what its model scores, recomputed here.

The shared `swept` fixture is a finished 10-trial sweep on informative tiny data. Each trial is
trained again below by a loop of this file's own (same seed, same batch order, same optimizer), and
every number the sweep recorded is compared with this independent evaluation.
"""

from __future__ import annotations

import copy

import pytest
import torch
from sweep_helpers import load_study, mlflow_runs, trial_records

from clothing.data import ClothingDataset, build_transforms
from clothing.features import cached_features
from clothing.model import build_head, load_backbone
from clothing.scoring import model_from_checkpoint
from clothing.train import set_seed
from sweep.tracking import Tracker


@pytest.fixture(scope="module")
def features(swept):
    """The sweep's cached features (a cache hit: the same numbers the trials trained on)."""
    backbone = load_backbone(swept.weights)
    train_set = ClothingDataset(swept.data_dir / "train", build_transforms())
    val_set = ClothingDataset(swept.data_dir / "validation", build_transforms(), train_set.class_to_idx)
    cache = swept.stores["--cache-dir"]
    train = cached_features(train_set, backbone, cache, precision="fp32", progress=False)
    val = cached_features(val_set, backbone, cache, precision="fp32", progress=False)
    assert train.cache_hit and val.cache_hit
    return train.plain, train.labels, val.plain, val.labels


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return (model.eval()(x).argmax(1) == y).sum().item() / len(y)


def retrain(params: dict, epochs: int, x, y, classes: int) -> list[torch.nn.Module]:
    """The trial's head after each epoch, from a loop written here: seed, init, one randperm per epoch."""
    set_seed(int(params["seed"]))
    head = build_head(classes, int(params["size_inner"]), float(params["dropout"]))
    optimizer = torch.optim.AdamW(head.parameters(), lr=float(params["lr"]), weight_decay=0.0, fused=True)
    generator = torch.Generator().manual_seed(int(params["seed"]))
    batch = int(params["batch_size"])
    snapshots = []
    for _ in range(epochs):
        head.train()
        order = torch.randperm(len(y), generator=generator)
        for start in range(0, len(y), batch):
            idx = order[start : start + batch]
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(head(x[idx]), y[idx]).backward()
            optimizer.step()
        snapshots.append(copy.deepcopy(head))
    return snapshots


def trial_runs(swept):
    client, runs = mlflow_runs(swept.stores)
    return client, [r for r in runs if r.data.tags.get("sweep.role") == "trial"]


def test_each_epoch_logs_the_accuracies_of_that_epochs_model(swept, features):
    train_x, train_y, val_x, val_y = features
    client, runs = trial_runs(swept)
    for run in runs:
        logged = {
            m: {h.step: h.value for h in client.get_metric_history(run.info.run_id, m)}
            for m in ("val_acc", "train_acc")
        }
        epochs = len(logged["val_acc"])
        models = retrain(run.data.params, epochs, train_x, train_y, classes=4)
        for epoch, model in enumerate(models, start=1):
            assert logged["val_acc"][epoch] == pytest.approx(accuracy(model, val_x, val_y), abs=1e-9), run.info.run_name
            assert logged["train_acc"][epoch] == pytest.approx(accuracy(model, train_x, train_y), abs=1e-9)


def test_the_best_epoch_is_the_argmax_and_its_checkpoint_reproduces_the_record(swept, features):
    _, _, val_x, val_y = features
    client, runs = trial_runs(swept)
    tracker = Tracker(swept.stores["--tracking-uri"])
    study = load_study(swept.stores)
    records = {r.run_id: r for r in trial_records(swept.stores)}
    for run in runs:
        history = [h.value for h in sorted(client.get_metric_history(run.info.run_id, "val_acc"), key=lambda h: h.step)]
        best_epoch = history.index(max(history)) + 1  # the first epoch that reached the best
        record = records[run.info.run_id]
        assert record.best_epoch == best_epoch == run.data.metrics["best/epoch"]
        assert record.val_acc == max(history) == run.data.metrics["best/val_acc"]
        head = tracker.fetch_checkpoint(record)
        assert head["metrics"]["epoch"] == best_epoch
        head_module = model_from_checkpoint(head, load_backbone(swept.weights)).head
        assert accuracy(head_module, val_x, val_y) == record.val_acc  # exactly: same features, same weights
        if record.state == "COMPLETE":
            assert study.trials[record.number].value == record.val_acc  # what Optuna optimises


def test_the_checkpoint_holds_the_best_epochs_weights(swept, features):
    train_x, train_y, _, _ = features
    client, runs = trial_runs(swept)
    tracker = Tracker(swept.stores["--tracking-uri"])
    records = {r.run_id: r for r in trial_records(swept.stores)}
    later_best = [
        r for r in runs if records[r.info.run_id].best_epoch < len(client.get_metric_history(r.info.run_id, "val_acc"))
    ]
    assert later_best, "some trial should have epochs after its best one"
    for run in later_best:
        record = records[run.info.run_id]
        models = retrain(run.data.params, record.best_epoch, train_x, train_y, classes=4)
        saved = tracker.fetch_checkpoint(record)["state_dict"]
        for name, value in models[-1].state_dict().items():
            torch.testing.assert_close(saved[f"head.{name}"], value)


def test_the_median_pruner_stops_trials_early(swept):
    study = load_study(swept.stores)
    pruned = [t for t in study.trials if t.state.name == "PRUNED"]
    assert pruned
    assert all(len(t.intermediate_values) < swept.epochs for t in pruned)
    _, runs = trial_runs(swept)
    stopped = [r for r in runs if r.data.tags["sweep.state"] == "PRUNED"]
    assert len(stopped) == len(pruned) and all(r.info.status == "KILLED" for r in stopped)
    assert all(r.data.tags["sweep.stop_reason"].startswith("pruned at epoch") for r in stopped)
