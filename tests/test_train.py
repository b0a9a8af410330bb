import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bench.images import calibrated_backbone
from clothing.data import ClothingDataset, build_transforms
from clothing.features import cached_features
from clothing.model import (
    ClothingClassifierMobileNet,
    build_head,
    count_parameters,
    load_backbone,
    trainable_parameters,
)
from clothing.train import EarlyStopping, FeatureBatches, TrainingDiverged, set_seed, train_and_evaluate

KEYS = {"epoch", "train_loss", "train_acc", "val_loss", "val_acc", "running_train_loss", "running_train_acc"}


def clusters(n_per_class=40, classes=4, dim=1280, seed=0):
    """Separable points: one Gaussian cluster per class."""
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(123))
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    return centres[labels] + torch.randn(len(labels), dim, generator=g), labels


def test_train_acc_is_the_eval_mode_accuracy_on_the_plain_training_data():
    """The honest gap: with dropout 0.5 over augmented views, the running train-mode accuracy
    understates how well the model fits its own training images; train_acc measures that fit."""
    x, y = clusters(n_per_class=30, dim=64)
    vx, vy = clusters(n_per_class=30, dim=64, seed=1)
    noise = torch.randn(len(y), 3, 64, generator=torch.Generator().manual_seed(5))
    views = torch.cat([x.unsqueeze(1), x.unsqueeze(1) + 4 * noise], dim=1)  # view 0 plain, 3 noisy ones
    set_seed(0)
    head = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 4))
    snapshots = []
    history = train_and_evaluate(
        head,
        torch.optim.Adam(head.parameters(), lr=3e-3),
        FeatureBatches(views, y, 16, shuffle=True, generator=torch.Generator().manual_seed(0), views=True),
        FeatureBatches(vx, vy, 64),
        nn.CrossEntropyLoss(),
        num_epochs=4,
        device="cpu",
        on_epoch=lambda epoch, metrics, model: snapshots.append(copy.deepcopy(model)),
        train_eval_loader=FeatureBatches(x, y, 50),
    )
    for h, model in zip(history, snapshots):
        with torch.no_grad():
            logits = model.eval()(x)
        assert h["train_acc"] == (logits.argmax(1) == y).sum().item() / len(y)  # an independent evaluation
        assert h["train_loss"] == pytest.approx(nn.functional.cross_entropy(logits, y).item(), rel=1e-5)
        assert h["train_acc"] >= h["running_train_acc"]
    assert any(h["train_acc"] > h["running_train_acc"] + 0.05 for h in history)


def test_history_has_one_entry_per_epoch_and_learns_a_separable_problem():
    x, y = clusters()
    vx, vy = clusters(seed=1)
    set_seed(0)
    head = build_head(4, size_inner=16)
    calls = []
    history = train_and_evaluate(
        head,
        torch.optim.Adam(head.parameters(), lr=1e-3),
        DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True),
        DataLoader(TensorDataset(vx, vy), batch_size=64),
        nn.CrossEntropyLoss(),
        num_epochs=3,
        device="cpu",
        on_epoch=lambda epoch, metrics, model: calls.append(epoch),
    )
    assert [h["epoch"] for h in history] == [1, 2, 3] == calls
    assert all(set(h) == KEYS for h in history)
    assert history[-1]["val_acc"] > 0.9  # chance is 0.25
    assert history[-1]["train_loss"] < history[0]["train_loss"]


def test_a_non_finite_loss_stops_training_at_once():
    x, y = clusters(n_per_class=8)
    head = build_head(4, size_inner=16)
    with torch.no_grad():
        head[0].weight.fill_(float("nan"))
    epochs = []
    with pytest.raises(TrainingDiverged, match="nan"):
        train_and_evaluate(
            head,
            torch.optim.SGD(head.parameters(), lr=0.1),
            FeatureBatches(x, y, 8),
            FeatureBatches(x, y, 8),
            nn.CrossEntropyLoss(),
            5,
            "cpu",
            on_epoch=lambda e, m, model: epochs.append(e),
        )
    assert epochs == []


def test_early_stopping_ends_after_patience_epochs_without_a_better_val_acc():
    stop = EarlyStopping(patience=2)
    # a tie is not better: the checkpointed epoch (the first best) stays the one to beat
    said = [stop({"val_acc": v}) for v in (0.5, 0.7, 0.6, 0.7)]
    assert said == [False, False, False, True]
    assert not any(EarlyStopping(patience=0)({"val_acc": 0.5}) for _ in range(20))  # 0: off
    with pytest.raises(ValueError, match="patience"):
        EarlyStopping(patience=-1)


def test_the_loop_stops_when_validation_stalls():
    x, y = clusters(n_per_class=8)
    head = build_head(4, size_inner=16)
    epochs = []
    history = train_and_evaluate(
        head,
        torch.optim.SGD(head.parameters(), lr=0.0),  # nothing changes: val_acc stalls from epoch 1
        FeatureBatches(x, y, 8),
        FeatureBatches(x, y, 8),
        nn.CrossEntropyLoss(),
        10,
        "cpu",
        lambda e, m, model: epochs.append(e),
        early_stop=EarlyStopping(3),
    )
    assert [h["epoch"] for h in history] == epochs == [1, 2, 3, 4]


def test_bf16_autocast_trains_fp32_weights_close_to_fp32_training():
    x, y = clusters(n_per_class=8)
    heads = {}
    for dtype in (None, torch.bfloat16):
        set_seed(0)
        heads[dtype] = head = build_head(4, size_inner=16)
        train_and_evaluate(
            head,
            torch.optim.SGD(head.parameters(), lr=0.05),
            FeatureBatches(x, y, 8),
            FeatureBatches(x, y, 8),
            nn.CrossEntropyLoss(),
            3,
            "cpu",
            autocast=dtype,
        )
    for fp32, bf16 in zip(heads[None].parameters(), heads[torch.bfloat16].parameters()):
        assert bf16.dtype == torch.float32  # master weights stay fp32
        assert not torch.equal(fp32, bf16)
        torch.testing.assert_close(bf16, fp32, rtol=0.05, atol=0.01)


def test_set_seed_makes_training_repeatable():
    x, y = clusters(n_per_class=10)

    def run():
        set_seed(3)
        head = build_head(4, size_inner=8, dropout=0.2)
        gen = torch.Generator().manual_seed(3)
        return train_and_evaluate(
            head,
            torch.optim.Adam(head.parameters(), lr=1e-2),
            FeatureBatches(x, y, 8, shuffle=True, generator=gen),
            FeatureBatches(x, y, 8),
            nn.CrossEntropyLoss(),
            2,
            "cpu",
        )

    assert run() == run()


def test_frozen_backbone_stays_in_eval_mode_and_only_the_head_trains():
    model = ClothingClassifierMobileNet(num_classes=3, size_inner=10, backbone=load_backbone(None))
    model.train()
    assert model.head.training and not model.features.training
    assert not any(m.training for m in model.features.modules())
    trainable, total = count_parameters(model)
    assert trainable == sum(p.numel() for p in model.head.parameters()) == 1280 * 10 + 10 + 10 * 3 + 3
    assert total > 2_000_000
    assert {id(p) for p in trainable_parameters(model)} == {id(p) for p in model.head.parameters()}


def test_size_inner_zero_is_a_linear_head():
    head = build_head(10, size_inner=0)
    assert [type(m) for m in head if isinstance(m, nn.Linear)] == [nn.Linear]
    assert head(torch.zeros(2, 1280)).shape == (2, 10)


def test_batchnorm_statistics_are_unchanged_by_training_on_images(data_dir):
    torch.manual_seed(0)
    model = ClothingClassifierMobileNet(num_classes=3, size_inner=8, backbone=load_backbone(None))
    before = {k: v.clone() for k, v in model.features.state_dict().items()}
    dataset = ClothingDataset(data_dir / "train", build_transforms())
    loader = DataLoader(dataset, batch_size=4, shuffle=True)
    train_and_evaluate(
        model, torch.optim.Adam(trainable_parameters(model), lr=1e-2), loader, loader, nn.CrossEntropyLoss(), 1, "cpu"
    )
    after = model.features.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights, running_mean/var, counters


def test_training_on_cached_features_equals_training_the_full_model_on_images(data_dir, tmp_path):
    """The sweep's fast path is exact: same initial head and batch order -> the same head weights.

    (SGD rather than Adam: Adam divides by tiny second moments, which magnifies float rounding in
    the features into visible weight differences without any difference in what is computed.) The
    backbone is calibrated so that its features are of order 1: the tolerances are relative to them."""
    backbone = calibrated_backbone()
    train_set = ClothingDataset(data_dir / "train", build_transforms())
    val_set = ClothingDataset(data_dir / "validation", build_transforms(), class_to_idx=train_set.class_to_idx)

    torch.manual_seed(1)
    full = ClothingClassifierMobileNet(num_classes=3, size_inner=8, backbone=backbone)
    initial_head = {k: v.clone() for k, v in full.head.state_dict().items()}
    image_history = train_and_evaluate(
        full,
        torch.optim.SGD(trainable_parameters(full), lr=0.05, momentum=0.9),
        DataLoader(train_set, batch_size=4),
        DataLoader(val_set, batch_size=4),
        nn.CrossEntropyLoss(),
        2,
        "cpu",
    )

    train = cached_features(train_set, backbone, tmp_path, precision="exact", progress=False)
    val = cached_features(val_set, backbone, tmp_path, precision="exact", progress=False)
    head = build_head(3, size_inner=8)
    head.load_state_dict(initial_head)
    feature_history = train_and_evaluate(
        head,
        torch.optim.SGD(head.parameters(), lr=0.05, momentum=0.9),
        FeatureBatches(train.plain, train.labels, 4),
        FeatureBatches(val.plain, val.labels, 4),
        nn.CrossEntropyLoss(),
        2,
        "cpu",
    )

    images = torch.stack([train_set[i][0] for i in range(len(train_set))])
    with torch.no_grad():
        pooled = full.pool(full.features(images))
    scale = pooled.abs().max().item()
    assert scale > 0.1, "the features should carry signal, or the comparison below is vacuous"
    torch.testing.assert_close(train.plain, pooled, rtol=1e-4, atol=1e-4 * scale)
    for name, value in head.state_dict().items():
        weight_scale = value.abs().max().item()
        torch.testing.assert_close(value, full.head.state_dict()[name], rtol=1e-4, atol=1e-4 * weight_scale)
    assert not torch.equal(head.state_dict()["0.weight"], initial_head["0.weight"])  # it did train
    for a, b in zip(image_history, feature_history):
        assert a["train_acc"] == b["train_acc"] and a["val_acc"] == b["val_acc"]
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
