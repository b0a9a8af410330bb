import shutil

import pytest
import torch

from bench.images import make_split, write_image
from clothing.data import (
    IMAGE_SIZE,
    ClothingDataset,
    DatasetError,
    build_transforms,
    discover_classes,
    try_image,
)


def test_classes_are_sorted_folders_and_files_are_sorted(data_dir):
    train = ClothingDataset(data_dir / "train")
    assert train.classes == ["hat", "pants", "shoes"]
    assert train.class_to_idx == {"hat": 0, "pants": 1, "shoes": 2}
    assert train.image_paths == sorted(train.image_paths)
    assert train.labels == [0] * 4 + [1] * 4 + [2] * 4


def test_validation_missing_a_class_keeps_the_train_labels(data_dir):
    shutil.rmtree(data_dir / "validation" / "pants")
    train = ClothingDataset(data_dir / "train")
    val = ClothingDataset(data_dir / "validation", class_to_idx=train.class_to_idx)
    assert val.classes == train.classes
    assert sorted(set(val.labels)) == [0, 2]  # shoes stays 2, not shifted to 1
    assert all("shoes" in p for p, label in zip(val.image_paths, val.labels) if label == 2)


def test_unknown_class_in_validation_is_named(data_dir):
    make_split(data_dir / "validation", classes=("socks",), per_class=1)
    train = ClothingDataset(data_dir / "train")
    with pytest.raises(DatasetError, match="socks"):
        ClothingDataset(data_dir / "validation", class_to_idx=train.class_to_idx)


def test_missing_or_empty_folders_say_what_layout_is_expected(tmp_path):
    with pytest.raises(DatasetError, match="does not exist.*one sub-folder per class"):
        discover_classes(tmp_path / "nope")
    (tmp_path / "train").mkdir()
    with pytest.raises(DatasetError, match="no class folders"):
        discover_classes(tmp_path / "train")
    (tmp_path / "train" / "hat").mkdir()
    (tmp_path / "train" / "hat" / "notes.txt").write_text("not an image")
    with pytest.raises(DatasetError, match=r"hat has no images"):
        ClothingDataset(tmp_path / "train")


def test_hidden_and_non_image_files_are_skipped(data_dir):
    hat = data_dir / "train" / "hat"
    (hat / ".DS_Store").write_bytes(b"\0\1")
    write_image(hat / ".hidden.jpg")
    (hat / "readme.txt").write_text("hello")
    (data_dir / "train" / ".cache").mkdir()
    train = ClothingDataset(data_dir / "train")
    assert train.classes == ["hat", "pants", "shoes"]
    assert len(train) == 12


@pytest.mark.parametrize("content", [b"", b"this is text, not a jpeg"], ids=["zero-byte", "text"])
def test_unreadable_image_error_names_the_file(data_dir, content):
    bad = data_dir / "train" / "hat" / "00.jpg"
    bad.write_bytes(content)
    dataset = ClothingDataset(data_dir / "train", build_transforms())
    with pytest.raises(DatasetError, match="00.jpg"):
        dataset[0]
    image, error = try_image(bad)
    assert image is None and str(bad) in str(error)  # the one bad-file rule every pass uses


def test_truncated_jpeg_is_reported(data_dir):
    path = data_dir / "train" / "hat" / "big.jpg"
    write_image(path, size=200)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert try_image(path)[0] is None


@pytest.mark.parametrize("mode,name", [("L", "g.jpg"), ("CMYK", "c.jpg"), ("RGBA", "a.png"), ("P", "p.png")])
def test_other_image_modes_are_converted_to_rgb(data_dir, mode, name):
    write_image(data_dir / "train" / "hat" / name, (200, 40, 40), mode=mode)
    dataset = ClothingDataset(data_dir / "train", build_transforms())
    image, label = dataset[dataset.image_paths.index(str(data_dir / "train" / "hat" / name))]
    assert image.shape == (3, IMAGE_SIZE, IMAGE_SIZE)
    assert label == 0


def test_eval_transform_is_deterministic_and_normalised(data_dir):
    dataset = ClothingDataset(data_dir / "train", build_transforms())
    first, second = dataset[0][0], dataset[0][0]
    assert torch.equal(first, second)
    assert first.dtype == torch.float32 and first.min() < 0  # normalised, not raw [0, 1]
