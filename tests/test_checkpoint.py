import pickle

import pytest
import torch

from bench.images import calibrated_backbone
from clothing.checkpoint import (
    MODEL,
    CheckpointError,
    checkpoint,
    load_checkpoint,
    load_model,
    save_checkpoint,
    spec_of,
)
from clothing.model import ModelSpec, build_model


class RunsCode:
    """A pickle that would create a file when unpickled: loading must never execute it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


SPEC = ModelSpec(classes=("a", "b", "c"), size_inner=10, mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2))


def saved_model(tmp_path):
    model = build_model(SPEC, calibrated_backbone()).eval()
    payload = checkpoint(MODEL, SPEC, model.state_dict(), metrics={}, provenance={"trial": "trial-000"})
    return model, save_checkpoint(payload, tmp_path / "model.pt")


def test_saved_model_loads_safely_and_predicts_the_same(tmp_path):
    model, path = saved_model(tmp_path)
    assert torch.load(path, weights_only=True)["spec"]["classes"] == ("a", "b", "c")
    loaded, payload = load_model(path)
    assert spec_of(payload) == SPEC
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no temp files left behind


def test_a_model_file_of_format_1_still_loads(tmp_path):
    """Files exported before the model spec: loose keys, dropout and finetune_blocks possibly absent."""
    model = build_model(SPEC, calibrated_backbone()).eval()
    old = {
        "format_version": 1,
        "kind": MODEL,
        "state_dict": model.state_dict(),
        "size_inner": 10,
        "num_classes": 3,
        "classes": ["a", "b", "c"],
        "image_size": 224,
        "mean": [0.5] * 3,
        "std": [0.2] * 3,
        "trial": 7,
    }
    loaded, payload = load_model(save_checkpoint(old, tmp_path / "old.pt"))
    assert spec_of(payload) == SPEC and payload["provenance"]["trial"] == 7
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_a_model_file_with_a_broken_spec_is_a_clear_error(tmp_path):
    payload = checkpoint(MODEL, SPEC, {}, metrics={})
    payload["spec"] = {"classes": ["a"], "colour": "blue"}
    with pytest.raises(CheckpointError, match="missing or broken fields"):
        load_checkpoint(save_checkpoint(payload, tmp_path / "broken.pt"))


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
