import pickle

import pytest
import torch
from click.testing import CliRunner

from clothing.__main__ import cli as clothing_cli
from clothing.checkpoint import MODEL, CheckpointError, load_checkpoint, load_model, save_checkpoint
from clothing.model import ClothingClassifierMobileNet, load_backbone


class RunsCode:
    """A pickle that would create a file when unpickled: loading must never execute it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def exported(tmp_path):
    model = ClothingClassifierMobileNet(num_classes=3, size_inner=10, backbone=load_backbone(None)).eval()
    payload = {
        "format_version": 1,
        "kind": MODEL,
        "state_dict": model.state_dict(),
        "size_inner": 10,
        "num_classes": 3,
        "classes": ["a", "b", "c"],
        "image_size": 224,
        "mean": [0.5] * 3,
        "std": [0.2] * 3,
    }
    return model, save_checkpoint(payload, tmp_path / "model.pt")


def test_saved_model_loads_safely_and_predicts_the_same(tmp_path):
    model, path = exported(tmp_path)
    assert torch.load(path, weights_only=True)["classes"] == ["a", "b", "c"]
    loaded, payload = load_model(path)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no temp files left behind


def test_a_failed_save_leaves_no_file(tmp_path):
    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        save_checkpoint({"x": Unpicklable()}, tmp_path / "model.pt")
    assert list(tmp_path.iterdir()) == []


def test_save_into_a_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        save_checkpoint({}, tmp_path / "missing" / "model.pt")


def test_a_code_running_pickle_is_rejected_without_running(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    with open(path, "wb") as handle:
        pickle.dump(RunsCode(marker), handle)
    torch.save({"evil": RunsCode(marker)}, tmp_path / "evil_zip.pt")
    marker.unlink(missing_ok=True)  # torch.save itself does not unpickle, but be sure
    for candidate in (path, tmp_path / "evil_zip.pt"):
        with pytest.raises(CheckpointError, match="not a clothing model"):
            load_checkpoint(candidate)
    assert not marker.exists()


def test_foreign_files_are_rejected(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    for name in ("notes.txt", "other.pt", "missing.pt"):
        with pytest.raises(CheckpointError):
            load_model(tmp_path / name)


def test_classify_prints_k_imagenet_classes_per_image(data_dir, tiny_weights):
    images = [str(data_dir / "train" / "hat" / "00.jpg"), str(data_dir / "train" / "shoes" / "01.jpg")]
    result = CliRunner().invoke(
        clothing_cli, ["classify", *images, "--top-k", "4", "--backbone-weights", str(tiny_weights)]
    )
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == images[0] and lines[5] == images[1]
    assert len(lines) == 10
    probabilities = [float(line.split()[0]) for line in lines[1:5]]
    assert probabilities == sorted(probabilities, reverse=True)


def test_classify_with_a_wrong_weights_file_is_one_error_line(tmp_path, data_dir):
    (tmp_path / "bad.pth").write_text("nope")
    result = CliRunner().invoke(
        clothing_cli,
        ["classify", str(data_dir / "train" / "hat" / "00.jpg"), "--backbone-weights", str(tmp_path / "bad.pth")],
    )
    assert result.exit_code == 1
    assert result.output.startswith("Error: ") and "bad.pth" in result.output
