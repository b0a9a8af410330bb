"""Augmented views in the feature cache, and partial fine-tuning on cached activations (stage 2)."""

import copy

import pytest
import torch
from images import calibrated_backbone
from mlflow import MlflowClient
from sweep_helpers import mlflow_runs, output_of, run_options, sweep
from torch import nn
from torch.utils.data import DataLoader

from clothing.checkpoint import HEAD, checkpoint, load_model, spec_of
from clothing.data import ClothingDataset, build_transforms
from clothing.extract import resolve_precision, resolve_training_precision
from clothing.features import cached_features
from clothing.model import (
    ClothingClassifierMobileNet,
    ModelSpec,
    finetune_cut,
    load_backbone,
    trainable_parameters,
    weights_fingerprint,
)
from clothing.scoring import export_model, split_logits
from clothing.train import FeatureBatches, TrainHooks, WeightAverage, train_and_evaluate
from sweep.finetune import layer_decayed_groups
from sweep.select import select_winner
from sweep.space import FINETUNE_SEARCH_LR, of_recipe
from sweep.study import describe_trial, read_studies, trial_records
from sweep.tracking import Tracker


def test_the_cache_holds_the_requested_views_each_different(train_set, tmp_path):
    backbone = load_backbone(None)
    views = cached_features(train_set, backbone, tmp_path, views=4, precision="exact", progress=False)
    assert views.features.shape == (12, 4, 1280) and views.views == 4
    for image in views.features:
        for a in range(4):
            for b in range(a + 1, 4):
                assert not torch.allclose(image[a], image[b], rtol=1e-3, atol=0), (a, b)
    plain = cached_features(train_set, backbone, tmp_path, precision="exact", progress=False)
    torch.testing.assert_close(views.plain, plain.plain)  # view 0 is the image as evaluation sees it
    # View 1 is the mirrored image, as evaluation would see a mirrored file.
    mirrored = copy.copy(train_set)
    mirrored.transform = build_transforms(mirror=True)
    as_mirrored = cached_features(mirrored, backbone, tmp_path / "mirrored", precision="exact", progress=False)
    scale = as_mirrored.plain.abs().max()  # this backbone's features are tiny: tolerances relative to them
    torch.testing.assert_close(views.features[:, 1], as_mirrored.plain, rtol=1e-4, atol=1e-4 * scale)
    # The random views are fixed: extracting them again elsewhere gives the same rows.
    again = cached_features(train_set, backbone, tmp_path / "other", views=4, precision="exact", progress=False)
    torch.testing.assert_close(again.features, views.features)
    assert cached_features(train_set, backbone, tmp_path, views=4, precision="exact", progress=False).cache_hit
    assert not cached_features(train_set, backbone, tmp_path, views=3, precision="exact", progress=False).cache_hit


def test_an_epoch_draws_one_view_per_image():
    images, views = 10, 4
    # Row (i, v) holds 10 * i + v, so every sample says which image and view it came from.
    x = (10 * torch.arange(images).unsqueeze(1) + torch.arange(views)).float().unsqueeze(-1)
    y = torch.arange(images)
    batches = FeatureBatches(x, y, 3, shuffle=True, generator=torch.Generator().manual_seed(0), views=True)
    drawn = []
    for _ in range(5):
        rows, labels = map(torch.cat, zip(*batches))
        assert sorted(labels.tolist()) == list(range(images))  # each image once per epoch
        assert torch.equal(rows[:, 0].long() // 10, labels)  # a view of the image itself
        drawn.append((rows[:, 0].long() % 10).tolist())
    assert len({v for epoch in drawn for v in epoch}) == views  # every view gets drawn
    assert drawn[0] != drawn[1]  # and another one next epoch


def test_finetuning_trains_only_the_blocks_after_the_cut(train_set):
    torch.manual_seed(0)
    model = ClothingClassifierMobileNet(num_classes=3, size_inner=8, backbone=load_backbone(None), finetune_blocks=2)
    assert model.cut == 16
    before = {k: v.clone() for k, v in model.features.state_dict().items()}
    loader = DataLoader(train_set, batch_size=4, shuffle=True)
    optimizer = torch.optim.Adam(trainable_parameters(model), lr=1e-2)
    train_and_evaluate(model, optimizer, loader, loader, nn.CrossEntropyLoss(), 1, "cpu")
    after = model.features.state_dict()
    frozen = [k for k in before if int(k.split(".")[0]) < model.cut]
    tuned = [k for k in before if int(k.split(".")[0]) >= model.cut]
    assert all(torch.equal(before[k], after[k]) for k in frozen)  # weights and BN statistics
    assert any(k.endswith("running_mean") for k in tuned)
    assert all(not torch.equal(before[k], after[k]) for k in tuned if not k.endswith("num_batches_tracked"))


def test_training_the_tail_on_cached_activations_equals_training_on_images(data_dir, tmp_path):
    """Stage 2's fast path is exact: same initial weights and batches -> the same blocks and head,
    BatchNorm statistics included (SGD for the reason given in test_train)."""
    train_set = ClothingDataset(data_dir / "train", build_transforms())
    val_set = ClothingDataset(data_dir / "validation", build_transforms(), class_to_idx=train_set.class_to_idx)
    backbone = calibrated_backbone(torch.stack([image for image, _ in train_set]))
    torch.manual_seed(1)
    full = ClothingClassifierMobileNet(3, 8, backbone=copy.deepcopy(backbone), finetune_blocks=1)
    cached = copy.deepcopy(full)

    def sgd(module):
        return torch.optim.SGD(trainable_parameters(module), lr=0.01, momentum=0.9)

    loaders = DataLoader(train_set, batch_size=4), DataLoader(val_set, batch_size=4)
    image_history = train_and_evaluate(full, sgd(full), *loaders, nn.CrossEntropyLoss(), 2, "cpu")

    options = dict(cut=cached.cut, precision="exact", progress=False)
    train = cached_features(train_set, backbone, tmp_path, views=1, **options)
    val = cached_features(val_set, backbone, tmp_path, **options)
    tail = cached.tail()
    batches = (
        FeatureBatches(train.activations(), train.labels, 4, views=True),
        FeatureBatches(val.activations()[:, 0], val.labels, 4),
    )
    cached_history = train_and_evaluate(tail, sgd(tail), *batches, nn.CrossEntropyLoss(), 2, "cpu")

    # Float tolerance: the cached activations come from batches of another size in channels-last
    # layout, so their last bits differ; two epochs carry that into ~1e-5 on a few weights.
    for name, value in full.state_dict().items():
        torch.testing.assert_close(cached.state_dict()[name], value, rtol=1e-3, atol=1e-4)
    for a, b in zip(image_history, cached_history):
        assert a["train_acc"] == b["train_acc"] and a["val_acc"] == b["val_acc"]
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)


def test_the_exported_finetuned_model_predicts_like_the_one_in_memory(train_set, tmp_path):
    backbone = load_backbone(None)
    torch.manual_seed(2)
    model = ClothingClassifierMobileNet(3, 8, backbone=copy.deepcopy(backbone), finetune_blocks=3)
    loader = DataLoader(train_set, batch_size=4, shuffle=True)
    optimizer = torch.optim.Adam(trainable_parameters(model), lr=1e-3)
    train_and_evaluate(model, optimizer, loader, loader, nn.CrossEntropyLoss(), 1, "cpu")
    spec = ModelSpec(tuple(train_set.classes), size_inner=8, finetune_blocks=3)
    provenance = {"backbone_fingerprint": weights_fingerprint(backbone), "trial": "finetune-000"}
    head = checkpoint(HEAD, spec, model.tail().state_dict(), train_config={}, metrics={}, provenance=provenance)
    assert {k.split(".")[0] for k in head["state_dict"]} == {"blocks", "head"}  # named, not indexed
    exported, payload = load_model(export_model(head, backbone, tmp_path / "model.pt", {}))
    assert spec_of(payload).finetune_blocks == 3
    images = torch.stack([train_set[i][0] for i in range(len(train_set))])
    with torch.no_grad():
        torch.testing.assert_close(exported(images), model.eval()(images))


def test_a_sweep_with_views_and_finetuning_adds_one_stage2_trial(stores, data_dir, tiny_weights, tmp_path):
    # fp32 features: the export below runs the full model in fp32, and "auto" may pick bf16 on this CPU.
    # OpenVINO, which "auto" leaves to longer passes than this test's.
    extra = ("--views", "2", "--finetune-blocks", "1", "--finetune-epochs", "2", "--precision", "fp32")
    extra += ("--engine", "openvino")
    result = sweep("run", *run_options(data_dir, tiny_weights, 3, 2), *extra, stores=stores)
    assert result.exit_code == 0, result.output

    # Stage 2 is a study of its own: the stage-1 sampler's history holds no stage-2 trial.
    studies = read_studies(stores["--storage"], "clothing")
    study, finetune = studies.stage1, studies.stage2
    assert len(study.trials) == 3 and all(set(t.params) == {"lr", "size_inner"} for t in study.trials)
    assert [t.state.name for t in finetune.trials] == ["COMPLETE"]
    records = trial_records(study, finetune)
    tuned = next(r for r in records if r.stage == "finetune")
    source = select_winner([r for r in records if r.stage == "head"])
    assert tuned.name == "finetune-000" and tuned.source_trial == source.number

    # Its Optuna params are what it trained with: its own lr, blocks, epochs and stabilisers, the
    # source's head.
    expected = {
        "source_trial": source.number,
        "finetune_blocks": 1,
        "lr": 3e-5,
        "epochs": 2,
        "label_smoothing": 0.0,
        "average": "none",
        "schedule": "constant",
        "train_precision": "fp32",  # --precision fp32: stage 2 trains in fp32 too
        "patience": 0,
        "lr_decay": 1.0,
        "size_inner": source.params["size_inner"],
    }
    assert tuned.params == expected
    client, runs = mlflow_runs(stores)
    run = next(r for r in runs if r.data.tags.get("stage") == "finetune")
    assert run.info.run_id == tuned.run_id and run.info.status == "FINISHED"
    assert run.info.run_name == "finetune-000" and "finetune-000" in result.output  # one name everywhere
    assert run.data.tags["optuna.trial_number"] == "0"
    assert {k: type(v)(run.data.params[k]) for k, v in expected.items()} == expected
    assert run.data.params["views"] == "2"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")] == [1, 2]
    assert sorted(finetune.trials[0].intermediate_values) == [1, 2]  # reported every epoch, like stage 1
    head = Tracker(stores["--tracking-uri"]).fetch_checkpoint(tuned)
    assert head["train_config"]["lr"] == 3e-5 and head["train_config"]["epochs"] == 2
    assert spec_of(head).finetune_blocks == 1 and head["provenance"]["trial"] == "finetune-000"
    assert run.data.params["trainable_parameters"] != run.data.params["total_parameters"]
    # The engine that extracted the features is recorded, and `best` scores with it.
    assert head["provenance"]["feature_engine"] == "openvino"
    stage1 = [r for r in runs if r.data.tags.get("sweep.role") == "trial" and r.data.tags.get("stage") != "finetune"]
    assert stage1 and {r.data.params["engine"] for r in stage1} == {"openvino"}
    # The parent's counts: stage 2 is a trial (complete), but `--trials` (finished) counts stage 1 only.
    parent = next(r for r in runs if r.data.tags.get("sweep.role") == "study")
    assert parent.data.params["engine"] == "openvino"
    assert parent.data.metrics["trials/finished"] == 3 and parent.data.metrics["trials/complete"] == 4

    # The export of the stage-2 checkpoint predicts what stage 2 measured.
    backbone = load_backbone(tiny_weights)
    class_to_idx = {c: i for i, c in enumerate(spec_of(head).classes)}
    val_set = ClothingDataset(data_dir / "validation", build_transforms(), class_to_idx)
    model, _ = load_model(export_model(head, backbone, tmp_path / "model.pt", {}))
    images = torch.stack([val_set[i][0] for i in range(len(val_set))])
    logits, labels = split_logits(head, backbone, val_set, stores["--cache-dir"], "cpu", precision="fp32")
    with torch.no_grad():
        torch.testing.assert_close(model(images), logits, rtol=1e-3, atol=1e-3)
    assert (logits.argmax(1) == labels).float().mean().item() == pytest.approx(tuned.val_acc)

    # Resuming neither adds sweep trials nor repeats stage 2.
    again = sweep("run", *run_options(data_dir, tiny_weights, 3, 2), *extra, stores=stores)
    assert again.exit_code == 0, again.output
    studies = read_studies(stores["--storage"], "clothing")
    assert [len(studies.stage1.trials), len(studies.stage2.trials)] == [3, 1]
    best = sweep("best", "--tolerance", "1", stores=stores)
    assert best.exit_code == 0, best.output
    shown = f"[stage 2 of trial-{source.number:03d}]" in best.output
    assert shown == (select_winner(records, 1).stage == "finetune")


def test_a_stage2_search_tries_two_depths_and_records_each_truthfully(stores, data_dir, tiny_weights):
    extra = ("--finetune-blocks", "2", "--finetune-trials", "2", "--finetune-epochs", "2", "--precision", "fp32")
    result = sweep("run", *run_options(data_dir, tiny_weights, 2, 1), *extra, stores=stores)
    assert result.exit_code == 0, result.output
    studies = read_studies(stores["--storage"], "clothing")
    study, finetune = studies.stage1, studies.stage2
    assert [t.state.name for t in finetune.trials] == ["COMPLETE", "COMPLETE"]  # the pruner let both finish
    # Deepest first: one cache at the cut for 2 blocks serves the 1-block trial too.
    assert [t.params["finetune_blocks"] for t in finetune.trials] == [2, 1]
    lrs = [t.params["lr"] for t in finetune.trials]
    assert all(FINETUNE_SEARCH_LR[0] <= lr <= FINETUNE_SEARCH_LR[1] for lr in lrs) and lrs[0] != lrs[1]
    _, runs = mlflow_runs(stores)
    tracker = Tracker(stores["--tracking-uri"])
    for trial, record in zip(finetune.trials, [r for r in trial_records(study, finetune) if r.stage == "finetune"]):
        run = next(r for r in runs if r.info.run_id == trial.user_attrs["mlflow_run_id"])
        assert run.info.run_name == f"finetune-{trial.number:03d}" and run.info.run_name in result.output
        assert float(run.data.params["lr"]) == trial.params["lr"]
        assert int(run.data.params["finetune_blocks"]) == trial.params["finetune_blocks"]
        head = tracker.fetch_checkpoint(record)  # the checkpoint is the model it says it is
        assert spec_of(head).finetune_blocks == trial.params["finetune_blocks"]
        assert head["train_config"]["lr"] == trial.params["lr"]
        blocks = {int(k.split(".")[1]) for k in head["state_dict"] if k.startswith("blocks.")}
        assert len(blocks) == trial.params["finetune_blocks"] + 1  # the blocks and the closing 1x1 conv
    # Resuming the search adds nothing; asking for a third trial adds the next depth of the cycle.
    again = sweep("run", *run_options(data_dir, tiny_weights, 2, 1), *extra, stores=stores)
    assert again.exit_code == 0 and len(read_studies(stores["--storage"], "clothing").stage2.trials) == 2
    more = sweep("run", *run_options(data_dir, tiny_weights, 2, 1), *extra, "--finetune-trials", "3", stores=stores)
    assert more.exit_code == 0, more.output
    assert [t.params["finetune_blocks"] for t in read_studies(stores["--storage"], "clothing").stage2.trials] == [
        2,
        1,
        2,
    ]


def test_activations_are_cached_in_half_precision_except_in_exact(train_set, tmp_path):
    """fp16 halves what stage 2 reads and holds; exact, the reference, stays fp32."""
    backbone = calibrated_backbone()
    exact = cached_features(train_set, backbone, tmp_path, cut=16, precision="exact", progress=False)
    fast = cached_features(train_set, backbone, tmp_path, cut=16, precision="fp32", progress=False)
    assert (exact.activations().dtype, fast.activations().dtype) == (torch.float32, torch.float16)
    assert fast.activation_file.stat().st_size < 0.6 * exact.activation_file.stat().st_size
    scale = exact.activations().abs().max()
    assert scale > 0.1  # informative activations: the comparison below means something
    torch.testing.assert_close(fast.activations().float(), exact.activations(), rtol=2e-3, atol=2e-3 * scale)
    bridged = fast.activations_at(17, backbone.features)  # through a frozen block, stored fp16 again
    assert bridged.dtype == torch.float16
    reference = exact.activations_at(17, backbone.features)
    torch.testing.assert_close(bridged.float(), reference, rtol=1e-2, atol=1e-2 * reference.abs().max())


def test_activations_from_a_deeper_cut_equal_the_ones_cached_at_the_cut(train_set, tmp_path):
    backbone = load_backbone(None)
    options = dict(precision="exact", progress=False, views=2)
    deep = cached_features(train_set, backbone, tmp_path, cut=15, **options)
    shallow = cached_features(train_set, backbone, tmp_path, cut=17, **options)
    torch.testing.assert_close(deep.activations_at(17, backbone.features), shallow.activations(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(deep.activations_at(17, backbone.features, view=1), shallow.activations()[:, 1])
    with pytest.raises(ValueError, match="cannot give"):
        shallow.activations_at(15, backbone.features)


def test_the_weight_average_is_the_exponential_average_of_every_step(train_set):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(24, 4), torch.randint(0, 3, (24,))
    average = WeightAverage(model, decay=0.9)
    expected = {k: v.clone() for k, v in model.state_dict().items()}  # the start, where it begins

    def after_step():
        average.update()
        for name, value in model.state_dict().items():
            expected[name] = 0.9 * expected[name] + 0.1 * value if value.is_floating_point() else value.clone()

    seen = []
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    batches = FeatureBatches(x, y, 6)
    train_and_evaluate(
        model, optimizer, batches, batches, nn.CrossEntropyLoss(), 2, "cpu",
        TrainHooks(lambda epoch, metrics, evaluated: seen.append(evaluated), after_step, average.averaged),
    )  # fmt: skip
    assert seen == [average.averaged, average.averaged]  # validated and checkpointed: the average
    for name, value in average.averaged.state_dict().items():
        torch.testing.assert_close(value, expected[name])
    assert not torch.allclose(average.averaged[0].weight, model[0].weight)  # not the last step's weights
    assert average.averaged.state_dict()["1.num_batches_tracked"] == 8  # 2 epochs x 4 steps, copied


def stage2_runs(stores) -> dict[str, object]:
    """The stage-2 MLflow runs by name."""
    _, runs = mlflow_runs(stores)
    return {r.info.run_name: r for r in runs if r.data.tags.get("stage") == "finetune"}


def test_bf16_stage2_records_its_precision_and_stays_within_2_percent_of_fp32(stores, data_dir, tiny_weights):
    # The same stage 2 of the same source twice, once per training precision: each is its own recipe,
    # so the second run adds finetune-001 next to finetune-000.
    options = (*run_options(data_dir, tiny_weights, 3, 2), "--finetune-blocks", "2", "--finetune-epochs", "3")
    options += ("--finetune-lr", "1e-3")
    for precision in ("fp32", "bf16"):
        result = sweep("run", *options, "--finetune-precision", precision, stores=stores)
        assert result.exit_code == 0, output_of(result)
    finetune = read_studies(stores["--storage"], "clothing").stage2
    assert [(t.params["train_precision"], t.state.name) for t in finetune.trials] == [
        ("fp32", "COMPLETE"),
        ("bf16", "COMPLETE"),
    ]
    assert finetune.trials[0].params["source_trial"] == finetune.trials[1].params["source_trial"]
    runs = stage2_runs(stores)
    assert {name: run.data.params["train_precision"] for name, run in runs.items()} == {
        "finetune-000": "fp32",
        "finetune-001": "bf16",
    }
    client = MlflowClient(stores["--tracking-uri"])

    def curve(name: str, key: str) -> list[float]:
        return [m.value for m in sorted(client.get_metric_history(runs[name].info.run_id, key), key=lambda m: m.step)]

    for key in ("val_loss", "train_loss"):
        fp32, bf16 = curve("finetune-000", key), curve("finetune-001", key)
        assert len(fp32) == len(bf16) == 3
        assert fp32 != bf16  # autocast really ran: bf16 rounds differently
        assert bf16 == pytest.approx(fp32, rel=0.02)  # the stated tolerance: 2 % of each epoch's loss


def test_auto_trains_stage2_in_bf16_only_where_the_features_are_native_bf16():
    cpu = torch.device("cpu")
    native = resolve_precision("auto", cpu) == "bf16"
    assert resolve_training_precision("auto", "auto", cpu) == ("bf16" if native else "fp32")
    assert resolve_training_precision("auto", "bf16", cpu) == ("bf16" if native else "fp32")
    for features in ("exact", "fp32"):
        assert resolve_training_precision("auto", features, cpu) == "fp32"
    assert resolve_training_precision("bf16", "exact", cpu) == "bf16"  # asked for by name


def test_patience_stops_a_stalled_stage2_and_keeps_the_best_epochs_checkpoint(stores, data_dir, tiny_weights):
    # lr 1e-7: the blocks barely move, so val_acc stalls at once and patience 2 ends the trial early.
    options = (*run_options(data_dir, tiny_weights, 3, 2), "--finetune-blocks", "1", "--finetune-epochs", "10")
    result = sweep("run", *options, "--finetune-lr", "1e-7", "--finetune-patience", "2", stores=stores)
    assert result.exit_code == 0, output_of(result)
    (trial,) = read_studies(stores["--storage"], "clothing").stage2.trials
    assert trial.state.name == "COMPLETE" and trial.params["patience"] == 2
    best_epoch = trial.user_attrs["best_epoch"]
    epochs_run = sorted(trial.intermediate_values)
    assert epochs_run == list(range(1, best_epoch + 3)) and len(epochs_run) < 10  # 2 epochs past the best
    line = describe_trial(trial, "finetune", 1.0)  # what the terminal says of it
    assert f"(stopped after epoch {len(epochs_run)} of 10: patience 2)" in line
    run = stage2_runs(stores)["finetune-000"]
    client = MlflowClient(stores["--tracking-uri"])
    history = client.get_metric_history(run.info.run_id, "val_acc")
    assert sorted(m.step for m in history) == epochs_run
    assert run.data.params["patience"] == "2" and run.data.metrics["best/epoch"] == best_epoch
    tuned = next(r for r in read_studies(stores["--storage"], "clothing").records() if r.stage == "finetune")
    head = Tracker(stores["--tracking-uri"]).fetch_checkpoint(tuned)
    assert head["metrics"]["epoch"] == best_epoch
    assert head["metrics"]["val_acc"] == max(m.value for m in history)


def test_layer_decay_gives_each_block_below_the_top_a_smaller_lr(tiny_weights):
    model = ClothingClassifierMobileNet(4, 10, backbone=load_backbone(tiny_weights), finetune_blocks=3)
    tail = model.tail()
    groups = layer_decayed_groups(tail, 1e-3, 0.5)
    # The head, the final 1x1 conv, then blocks 17, 16, 15: each at half the lr of the one above.
    assert [g["lr"] for g in groups] == pytest.approx([1e-3, 1e-3, 5e-4, 2.5e-4, 1.25e-4])
    assert [id(p) for g in groups[1:] for p in g["params"]] == [
        id(p) for layer in reversed(list(model.features[model.cut :])) for p in layer.parameters()
    ]
    # Every trainable parameter is in exactly one group; with decay 1 all share the lr.
    assert sorted(id(p) for g in groups for p in g["params"]) == sorted(map(id, trainable_parameters(tail)))
    assert {g["lr"] for g in layer_decayed_groups(tail, 1e-3, 1.0)} == {1e-3}


def test_a_stage2_with_layer_decay_records_it_and_moves_earlier_blocks_less(stores, data_dir, tiny_weights):
    options = (*run_options(data_dir, tiny_weights, 2, 1), "--finetune-blocks", "2", "--finetune-epochs", "2")
    result = sweep("run", *options, "--finetune-lr", "1e-3", "--finetune-lr-decay", "0.01", stores=stores)
    assert result.exit_code == 0, output_of(result)
    (trial,) = read_studies(stores["--storage"], "clothing").stage2.trials
    assert trial.params["lr_decay"] == 0.01
    assert stage2_runs(stores)["finetune-000"].data.params["lr_decay"] == "0.01"
    tuned = next(r for r in read_studies(stores["--storage"], "clothing").records() if r.stage == "finetune")
    trained = Tracker(stores["--tracking-uri"]).fetch_checkpoint(tuned)["state_dict"]
    before = load_backbone(tiny_weights).features

    def moved(index: int) -> float:
        """The mean step training took the weights of trunk layer `index` (AdamW's steps scale with the lr)."""
        original = dict(before[index].named_parameters())
        steps = [(trained[f"blocks.{index}.{k}"] - v).abs().flatten() for k, v in original.items()]
        return float(torch.cat(steps).mean())

    # The final conv (18) trains at 1e-3, block 17 at 1e-3 x 0.01, block 16 (the cut) at 1e-3 x 0.01^2.
    assert finetune_cut(2) == 16
    assert moved(18) > 10 * moved(17) > 100 * moved(16) > 0


def test_a_stage2_trial_from_before_lr_decay_counts_as_the_recipe_without_decay():
    recipe = {"lr": 1e-4, "finetune_blocks": 3, "lr_decay": 1.0}
    older = {"lr": 1e-4, "finetune_blocks": 3}  # recorded before the param existed: one lr for all
    assert of_recipe(older, recipe)  # a resumed study does not fine-tune it again
    assert not of_recipe(older, {**recipe, "lr_decay": 0.7})
    assert not of_recipe({**older, "lr_decay": 0.7}, recipe)


def test_stage2_from_several_sources_fine_tunes_the_winner_then_the_next_best(stores, data_dir, tiny_weights):
    """--finetune-sources 2: the rule's winner and the next COMPLETE trial by val_acc, one stage-2 trial
    each, each recorded with its source and the source's head; a re-run adds nothing."""
    extra = ("--finetune-blocks", "1", "--finetune-epochs", "1", "--finetune-sources", "2", "--pruner", "none")
    options = (*run_options(data_dir, tiny_weights, 3, 1), *extra, "--precision", "fp32")
    result = sweep("run", *options, stores=stores)
    assert result.exit_code == 0, result.output
    studies = read_studies(stores["--storage"], "clothing")
    records = trial_records(studies.stage1)
    winner = select_winner(records, 0.02)
    others = [r for r in records if r.state == "COMPLETE" and r.number != winner.number]
    runner_up = max(others, key=lambda r: (r.val_acc, -r.gap))
    sources = [t.params["source_trial"] for t in studies.stage2.trials]
    assert sources == [winner.number, runner_up.number], result.output
    for trial in studies.stage2.trials:
        source = studies.stage1.trials[trial.params["source_trial"]]
        assert trial.params["size_inner"] == source.params["size_inner"]  # the source's head, not another's
    runs = stage2_runs(stores)
    assert [runs[f"finetune-{n:03d}"].data.params["source_trial"] for n in (0, 1)] == [str(s) for s in sources]
    again = sweep("run", *options, stores=stores)
    assert again.exit_code == 0 and len(read_studies(stores["--storage"], "clothing").stage2.trials) == 2
