"""Augmented views in the feature cache, and partial fine-tuning on cached activations (stage 2)."""

import copy
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from sweep_helpers import mlflow_runs, output_of, plain_file, run_options, sweep, trial_records
from torch import nn
from torch.utils.data import DataLoader

from bench.images import calibrated_backbone
from clothing.checkpoint import HEAD, checkpoint, load_model, spec_of
from clothing.data import ClothingDataset, build_transforms
from clothing.extract import resolve_precision, resolve_training_precision
from clothing.features import cached_features
from clothing.inference import BatchOptions
from clothing.model import (
    ClothingClassifierMobileNet,
    ModelSpec,
    finetune_cut,
    load_backbone,
    trainable_parameters,
    weights_fingerprint,
)
from clothing.scoring import export_model, folder_accuracy, model_from_checkpoint
from clothing.train import FeatureBatches, train_and_evaluate
from sweep.config import Stores
from sweep.objective import Stage2Recipe
from sweep.ranking import select_winner
from sweep.study import describe_trial, read_studies
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
    exported, payload = load_model(export_model(head, model_from_checkpoint(head, backbone), tmp_path / "model.pt", {}))
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
    studies = read_studies(Stores(storage=stores["--storage"]))
    study, finetune = studies.stage1, studies.stage2
    assert len(study.trials) == 3 and all(set(t.params) == {"lr", "size_inner"} for t in study.trials)
    assert [t.state.name for t in finetune.trials] == ["COMPLETE"]
    records = studies.records()
    tuned = next(r for r in records if r.stage == "finetune")
    source = select_winner([r for r in records if r.stage == "head"], 0.02)
    assert tuned.name == "finetune-000" and tuned.source_trial == source.number

    # Its Optuna params are what it trained with: its own lr, blocks, epochs, precision and patience,
    # the source's head.
    expected = {
        "source_trial": source.number,
        "finetune_blocks": 1,
        "lr": 1e-4,
        "epochs": 2,
        "train_precision": "fp32",  # --precision fp32: stage 2 trains in fp32 too
        "patience": 1,
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
    assert head["train_config"]["lr"] == 1e-4 and head["train_config"]["epochs"] == 2
    assert head["provenance"]["source_trial"] == source.number and head["provenance"]["patience"] == 1
    assert spec_of(head).finetune_blocks == 1 and head["provenance"]["trial"] == "finetune-000"
    assert run.data.params["trainable_parameters"] != run.data.params["total_parameters"]
    # The engine that extracted the features is recorded.
    assert head["provenance"]["feature_engine"] == "openvino"
    stage1 = [r for r in runs if r.data.tags.get("sweep.role") == "trial" and r.data.tags.get("stage") != "finetune"]
    assert stage1 and {r.data.params["engine"] for r in stage1} == {"openvino"}
    # The parent's counts: stage 2 is a trial (complete), but `--trials` (finished) counts stage 1 only.
    parent = next(r for r in runs if r.data.tags.get("sweep.role") == "study")
    assert parent.data.params["engine"] == "openvino"
    assert parent.data.metrics["trials/finished"] == 3 and parent.data.metrics["trials/complete"] == 4

    # The export of the stage-2 checkpoint predicts what stage 2 measured, as `predict` runs it.
    model = model_from_checkpoint(head, load_backbone(tiny_weights))
    exported, payload = load_model(export_model(head, model, tmp_path / "model.pt", {}))
    val_acc = folder_accuracy(exported, spec_of(payload), data_dir / "validation", BatchOptions())
    assert val_acc == pytest.approx(tuned.val_acc)

    # Resuming neither adds sweep trials nor repeats stage 2.
    again = sweep("run", *run_options(data_dir, tiny_weights, 3, 2), *extra, stores=stores)
    assert again.exit_code == 0, again.output
    studies = read_studies(Stores(storage=stores["--storage"]))
    assert [len(studies.stage1.trials), len(studies.stage2.trials)] == [3, 1]
    best = sweep("best", "--tolerance", "1", stores=stores)
    assert best.exit_code == 0, best.output
    shown = f"[stage 2 of trial-{source.number:03d}]" in best.output
    assert shown == (select_winner(records, 1).stage == "finetune")
    assert Stage2Recipe.read(finetune.trials[0].params).pinned() == finetune.trials[0].params


def test_another_recipes_stage_2_on_the_same_study_runs_its_epochs_whatever_the_first_ones_curve(
    stores, data_dir, tiny_weights
):
    """The README's path: a sweep with stage 2, then another recipe on the same study (there: the thorough
    file). The second stage 2 trails the first one's curve, which a median pruner would stop it for, and
    a PRUNED trial never wins; it is not pruned, it runs every epoch and is ranked."""
    stage2 = ("--finetune-blocks", "1", "--finetune-epochs", "4", "--finetune-patience", "0", "--precision", "fp32")
    for lr in ("1e-2", "1e-7"):  # the second barely moves from its source head
        result = sweep("run", *run_options(data_dir, tiny_weights, 3, 2), *stage2, "--finetune-lr", lr, stores=stores)
        assert result.exit_code == 0, output_of(result)
    first, second = read_studies(Stores(storage=stores["--storage"])).stage2.trials
    curves = first.intermediate_values, second.intermediate_values
    assert any(curves[1][epoch] < curves[0][epoch] for epoch in (2, 3, 4)), curves  # what a median pruner prunes
    assert [first.state.name, second.state.name] == ["COMPLETE", "COMPLETE"]
    assert sorted(curves[1]) == [1, 2, 3, 4]
    assert "finetune-001" in [r.name for r in trial_records(stores) if r.state == "COMPLETE"]


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


def stage2_runs(stores) -> dict[str, object]:
    """The stage-2 MLflow runs by name."""
    _, runs = mlflow_runs(stores)
    return {r.info.run_name: r for r in runs if r.data.tags.get("stage") == "finetune"}


def test_bf16_stage2_records_its_precision_and_stays_within_2_percent_of_fp32(stores, data_dir, tiny_weights, tmp_path):
    # The same stage 2 of the same source twice, once per training precision (a sweep file's setting):
    # each is its own recipe, so the second run adds finetune-001 next to finetune-000.
    options = (*run_options(data_dir, tiny_weights, 3, 2), "--finetune-blocks", "2", "--finetune-epochs", "3")
    options += ("--finetune-lr", "1e-3", "--finetune-patience", "0", "--precision", "bf16")
    for precision in ("fp32", "bf16"):
        result = sweep("run", *options, *plain_file(tmp_path, finetune_precision=precision), stores=stores)
        assert result.exit_code == 0, output_of(result)
    finetune = read_studies(Stores(storage=stores["--storage"])).stage2
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

    # Validation is scored as the exported model predicts, in fp32: its images extracted in fp32 (the
    # training features are bf16), and the bf16-trained blocks evaluated without autocast.
    tuned = next(r for r in read_studies(Stores(storage=stores["--storage"])).records() if r.name == "finetune-001")
    head, backbone = Tracker(stores["--tracking-uri"]).fetch_checkpoint(tuned), load_backbone(tiny_weights)
    val_set = ClothingDataset(data_dir / "validation", build_transforms(), train_classes(head))
    cache = stores["--cache-dir"]
    val = cached_features(val_set, backbone, cache, precision="fp32", cut=finetune_cut(2), progress=False)
    assert val.cache_hit  # the sweep's own validation cache
    with torch.no_grad():
        logits = model_from_checkpoint(head, backbone).tail()(val.activations()[:, 0].float())
    fp32_loss = nn.functional.cross_entropy(logits, val.labels).item()
    assert fp32_loss == pytest.approx(head["metrics"]["val_loss"], rel=1e-4)


def train_classes(head: dict) -> dict[str, int]:
    return {c: i for i, c in enumerate(spec_of(head).classes)}


def test_auto_picks_bf16_exactly_where_the_cpu_lists_native_bf16():
    """Not oneDNN's check, which says yes on plain AVX-512 too, where bf16 is emulated and slower."""
    flags = set(Path("/proc/cpuinfo").read_text().split()) if Path("/proc/cpuinfo").exists() else set()
    native = bool(flags & {"avx512_bf16", "amx_bf16"})
    assert resolve_precision("auto", torch.device("cpu")) == ("bf16" if native else "fp32")


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
    (trial,) = read_studies(Stores(storage=stores["--storage"])).stage2.trials
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
    tuned = next(r for r in read_studies(Stores(storage=stores["--storage"])).records() if r.stage == "finetune")
    head = Tracker(stores["--tracking-uri"]).fetch_checkpoint(tuned)
    assert head["metrics"]["epoch"] == best_epoch
    assert head["metrics"]["val_acc"] == max(m.value for m in history)


def test_an_older_stage2_trial_reads_as_the_recipe_it_ran():
    """A resumed study does not fine-tune a source again because a param was added since its trial, and
    a trial that ran a lever since removed is another recipe."""
    recipe = Stage2Recipe(3, 3, 1e-4, 6, "fp32", 1, {"size_inner": 100})
    assert Stage2Recipe.read(recipe.pinned()) == recipe
    older = {k: v for k, v in recipe.pinned().items() if k not in ("train_precision", "patience")}
    assert Stage2Recipe.read(older) == replace(recipe, patience=0)  # from before patience: it ran them all
    retired = {"average": "none", "schedule": "constant", "lr_decay": 1.0, "label_smoothing": 0.0}
    assert Stage2Recipe.read({**recipe.pinned(), **retired}) == recipe  # the removed levers at their neutral value
    assert Stage2Recipe.read({**recipe.pinned(), "average": "ema"}) is None
    assert Stage2Recipe.read({**recipe.pinned(), "lr_decay": 0.7}) is None
    assert Stage2Recipe.read({**recipe.pinned(), "size_inner": 10}) != recipe  # another source's head
