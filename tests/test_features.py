import os
from pathlib import Path

import pytest
import torch

import clothing.engines as engines
import clothing.features as features_module
from bench.images import calibrated_backbone, write_image
from clothing.data import ClothingDataset, build_transforms
from clothing.engines import EngineError, resolve_engine
from clothing.features import BadImagesError, cached_features
from clothing.model import load_backbone
from clothing.train import FeatureBatches


def test_second_call_reads_the_cache_without_running_the_backbone(train_set, tmp_path, monkeypatch):
    backbone = load_backbone(None)
    first = cached_features(train_set, backbone, tmp_path, progress=False)
    assert not first.cache_hit and first.features.shape == (12, 1, 1280)

    def must_not_run(*args, **kwargs):
        raise AssertionError("the backbone ran although the cache should have hit")

    monkeypatch.setattr(features_module, "extract_features", must_not_run)
    second = cached_features(train_set, backbone, tmp_path, progress=False)
    assert second.cache_hit
    assert torch.equal(first.features, second.features) and torch.equal(first.labels, second.labels)


def test_changing_an_image_misses_the_cache(train_set, tmp_path):
    backbone = load_backbone(None)
    before = cached_features(train_set, backbone, tmp_path, progress=False)
    changed = train_set.image_paths[0]
    write_image(Path(changed), (255, 255, 255), seed=99)
    os.utime(changed, ns=(1, 1))  # a different mtime even on coarse-grained file systems
    after = cached_features(train_set, backbone, tmp_path, progress=False)
    assert not after.cache_hit
    assert not torch.equal(before.features[0], after.features[0])
    torch.testing.assert_close(before.features[1:], after.features[1:])


def test_every_field_of_the_cache_key_matters(train_set, tmp_path):
    """Weights, precision, engine, views and the files: change any one and the cache misses."""
    backbone = calibrated_backbone()
    openvino = dict(precision="fp32", engine="openvino", progress=False)
    first = cached_features(train_set, backbone, tmp_path, **openvino)
    assert cached_features(train_set, backbone, tmp_path, **openvino).cache_hit
    assert not cached_features(train_set, backbone, tmp_path, precision="exact", progress=False).cache_hit
    by_torch = cached_features(train_set, backbone, tmp_path, precision="fp32", progress=False)
    assert by_torch.engine == "torch" and not by_torch.cache_hit  # auto: 12 images are too few for openvino
    assert not cached_features(train_set, backbone, tmp_path, precision="fp32", views=2, progress=False).cache_hit
    assert not cached_features(
        train_set, calibrated_backbone(seed=1), tmp_path, precision="fp32", progress=False
    ).cache_hit
    os.utime(train_set.image_paths[3], ns=(1, 1))
    assert not cached_features(train_set, backbone, tmp_path, precision="fp32", progress=False).cache_hit
    assert first.features.abs().max() > 0.1  # informative features: the comparisons above mean something


def test_cached_features_are_the_models_own_pooled_features(train_set, tmp_path):
    backbone = calibrated_backbone()
    images = torch.stack([image for image, _ in train_set])
    with torch.no_grad():
        expected = torch.nn.functional.adaptive_avg_pool2d(backbone.features(images), 1).flatten(1)
    scale = expected.abs().max().item()
    assert scale > 0.1, "the backbone's features should carry signal"
    for precision in ("exact", "fp32"):
        cached = cached_features(train_set, backbone, tmp_path, precision=precision, progress=False).plain
        torch.testing.assert_close(cached, expected, rtol=1e-3, atol=1e-3 * scale)


def test_other_weights_or_transform_miss_the_cache(train_set, tmp_path):
    cached_features(train_set, load_backbone(None), tmp_path, progress=False)
    assert not cached_features(train_set, load_backbone(None), tmp_path, progress=False).cache_hit
    backbone = load_backbone(None)
    cached_features(train_set, backbone, tmp_path, progress=False)
    train_set.transform = build_transforms(image_size=192)
    assert not cached_features(train_set, backbone, tmp_path, progress=False).cache_hit


@pytest.mark.parametrize("engine", ["torch", "openvino"])
def test_fast_pipeline_stays_within_the_quality_guard(train_set, tmp_path, engine):
    """Every engine, in fp32, bf16 and auto, keeps cosine >= 0.99 with eager fp32 on every image."""
    backbone = load_backbone(None)
    reference = cached_features(train_set, backbone, tmp_path, precision="exact", progress=False)
    assert reference.engine == "torch"  # exact is eager torch, whatever the engine
    for precision in ("fp32", "bf16", "auto"):
        fast = cached_features(train_set, backbone, tmp_path, precision=precision, engine=engine, progress=False)
        assert fast.engine == engine and fast.cache_hit == (precision == "auto")  # auto is fp32 or bf16
        cosine = torch.nn.functional.cosine_similarity(reference.plain, fast.plain, dim=1)
        assert cosine.min() >= 0.99, precision
        if precision == "fp32":
            torch.testing.assert_close(fast.plain, reference.plain, rtol=1e-3, atol=1e-3 * reference.plain.abs().max())


def test_an_engine_that_cannot_run_here_is_refused_and_auto_falls_back(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_engine("auto", cpu, "fp32") == "openvino"
    assert resolve_engine("auto", cpu, "fp32", images=12) == "torch"  # too short to repay the conversion
    assert resolve_engine("openvino", cpu, "exact") == "torch"  # exact is the eager torch reference
    assert resolve_engine("auto", torch.device("cuda"), "bf16") == "torch"
    with pytest.raises(EngineError, match="runs on the CPU"):
        resolve_engine("openvino", torch.device("cuda"), "fp32")
    monkeypatch.setattr(engines, "openvino_installed", lambda: False)
    assert resolve_engine("auto", cpu, "fp32") == "torch"
    with pytest.raises(EngineError, match="pip install openvino"):
        resolve_engine("openvino", cpu, "fp32")


def test_unreadable_images_are_all_listed_or_skipped(train_set, tmp_path):
    bad = [train_set.image_paths[1], train_set.image_paths[6]]
    for path in bad:
        with open(path, "wb") as handle:
            handle.write(b"not a jpeg")
    backbone = load_backbone(None)
    with pytest.raises(BadImagesError) as excinfo:
        cached_features(train_set, backbone, tmp_path, progress=False)
    assert excinfo.value.paths == bad
    assert "--skip-bad-images" in str(excinfo.value)
    kept = cached_features(train_set, backbone, tmp_path, skip_bad_images=True, progress=False)
    assert kept.cache_hit  # the failed run's single pass was cached, not repeated
    assert kept.bad_paths == bad and len(kept.labels) == 10
    assert kept.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 2]


def test_no_partial_cache_file_after_an_interrupted_extraction(train_set, tmp_path, monkeypatch):
    class Interrupted(Exception):
        pass

    backbone = load_backbone(None)
    last_layer = backbone.features[-1]
    calls = []

    def explode_on_the_second_batch(images):
        calls.append(len(images))
        if len(calls) > 2:  # a probe of one image, one batch written, then the interruption
            raise Interrupted
        return type(last_layer).forward(last_layer, images)

    monkeypatch.setattr(last_layer, "forward", explode_on_the_second_batch)
    with pytest.raises(Interrupted):
        cached_features(train_set, backbone, tmp_path / "cache", precision="exact", batch_size=4, progress=False)
    assert calls == [1, 4, 4]
    assert list((tmp_path / "cache").iterdir()) == []


def test_feature_batches_reshuffle_every_epoch_and_cover_every_sample():
    x, y = torch.arange(10.0).unsqueeze(1), torch.arange(10)
    batches = FeatureBatches(x, y, 4, shuffle=True, generator=torch.Generator().manual_seed(0))
    epochs = [torch.cat([labels for _, labels in batches]).tolist() for _ in range(2)]
    assert len(batches) == 3
    assert all(sorted(order) == list(range(10)) for order in epochs)
    assert epochs[0] != epochs[1]
    assert [labels.tolist() for _, labels in FeatureBatches(x, y, 4)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_the_decode_and_engine_give_the_same_features_run_to_run_from_one_conversion(
    data_dir, train_set, tmp_path, monkeypatch
):
    # The chosen path (uint8 views decoded once by PIL, normalised in the trunk, on OpenVINO): two
    # passes into two fresh caches give the same numbers bit for bit, and the second pass and the
    # validation split reuse the first pass's converted trunk.
    conversions = []
    convert = engines.openvino_trunk
    monkeypatch.setattr(engines, "openvino_trunk", lambda *args: conversions.append(args[1]) or convert(*args))
    monkeypatch.setattr(engines, "_LAST_BUILT", {})
    backbone = load_backbone(None)
    options = {"precision": "fp32", "engine": "openvino", "views": 2, "progress": False}
    first = cached_features(train_set, backbone, tmp_path / "a", **options)
    again = cached_features(train_set, backbone, tmp_path / "b", **options)
    assert not again.cache_hit and torch.equal(first.features, again.features)
    val_set = ClothingDataset(data_dir / "validation", build_transforms(), train_set.class_to_idx)
    cached_features(val_set, backbone, tmp_path / "a", **options)
    assert conversions == ["fp32"]
    # Other weights, or another precision, are another trunk.
    cached_features(train_set, backbone, tmp_path / "a", **{**options, "precision": "bf16"})
    cached_features(train_set, load_backbone(None), tmp_path / "c", **options)
    assert conversions == ["fp32", "bf16", "fp32"]
