"""The winner's head checkpoint (an MLflow artifact) + the backbone -> a self-contained model.pt, a
registered MLflow model, or a test-time-augmented validation score."""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import torch

import clothing
from clothing.checkpoint import FORMAT_VERSION, HEAD, MODEL, CheckpointError, load_checkpoint, save_checkpoint
from clothing.data import ClothingDataset, build_transforms
from clothing.features import cached_features
from clothing.model import ClothingClassifierMobileNet, build_head, weights_fingerprint
from sweep.select import TrialRecord
from sweep.tracking import Tracker

CHECKPOINT_ARTIFACT = "checkpoint/head.pt"


def fetch_head(tracker: Tracker, record: TrialRecord) -> dict:
    """The trial's checkpoint (its head, and for stage 2 its fine-tuned blocks), from its MLflow run."""
    if not record.run_id:
        raise CheckpointError(f"{record.name} has no MLflow run to take its checkpoint from")
    with tempfile.TemporaryDirectory() as tmp:
        return load_checkpoint(tracker.download(record.run_id, CHECKPOINT_ARTIFACT, tmp), kind=HEAD)


def head_module(head: dict) -> torch.nn.Module:
    module = build_head(head["num_classes"], head["size_inner"], head.get("dropout", 0.0))
    module.load_state_dict(head["state_dict"])
    return module.eval()


def check_backbone(head: dict, backbone: torch.nn.Module) -> None:
    if weights_fingerprint(backbone) != head["backbone_fingerprint"]:
        raise CheckpointError(
            "the winner was trained on other backbone weights than the ones given; pass the same "
            "--backbone-weights (or CLOTHING_BACKBONE_WEIGHTS) as for `sweep run`"
        )


def build_model(head: dict, backbone: torch.nn.Module) -> ClothingClassifierMobileNet:
    """The full model: the given backbone's trunk with the trained head, and for a stage-2 checkpoint
    its fine-tuned last blocks (on a copy: the caller's backbone keeps serving the feature cache)."""
    check_backbone(head, backbone)
    blocks = head.get("finetune_blocks", 0)
    model = ClothingClassifierMobileNet(
        head["num_classes"],
        head["size_inner"],
        head.get("dropout", 0.0),
        copy.deepcopy(backbone) if blocks else backbone,
        finetune_blocks=blocks,
    )
    model.head.load_state_dict(head["state_dict"])
    if blocks:
        model.features[model.cut :].load_state_dict(head["trunk_state_dict"])
    return model.eval()


def export_model(head: dict, backbone: torch.nn.Module, path: str | Path, metrics: dict) -> Path:
    """Write the winner as a full model in the export format (see DESIGN.md), atomically."""
    model = build_model(head, backbone)
    payload = {
        "format_version": FORMAT_VERSION,
        "kind": MODEL,
        "state_dict": model.state_dict(),
        "size_inner": head["size_inner"],
        "dropout": head.get("dropout", 0.0),
        "finetune_blocks": head.get("finetune_blocks", 0),
        "num_classes": head["num_classes"],
        "classes": head["classes"],
        "image_size": head["image_size"],
        "mean": head["mean"],
        "std": head["std"],
        "metrics": metrics,
        "study": head["study"],
        "trial": head["trial"],
        "mlflow_run_id": head["mlflow_run_id"],
    }
    return save_checkpoint(payload, path)


def register_winner(tracker: Tracker, head: dict, backbone: torch.nn.Module, name: str) -> str:
    """Log the winner's full model on its run as an MLflow PyTorch model and register a version of `name`."""
    model = build_model(head, backbone)
    size = head["image_size"]
    example = torch.zeros(1, 3, size, size).numpy()  # one normalised image, NCHW float32
    metadata = {
        "classes": list(head["classes"]),
        "preprocessing": f"RGB, Resize(({size}, {size})), ToTensor, Normalize(mean, std); input NCHW float32",
        "image_size": size,
        "mean": list(head["mean"]),
        "std": list(head["std"]),
        "output": "logits, one per class in `classes` order",
    }
    code = [str(Path(clothing.__file__).parent)]
    return tracker.register_model(head["mlflow_run_id"], model, name, example, metadata, code)


def split_logits(
    head: dict, backbone: torch.nn.Module, split: ClothingDataset, cache_dir: Path, device, precision: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) of the checkpoint over a split, from cached features, or for a fine-tuned
    checkpoint from the activations cached at its cut: the frozen trunk runs at most once per split.
    The features are extracted in the precision the trial trained on, unless `precision` says otherwise."""
    precision = precision or head.get("feature_precision", "auto")
    if head.get("finetune_blocks", 0):
        model = build_model(head, backbone)
        module, cut = model.tail(), model.cut
    else:
        module, cut = head_module(head), None
    features = cached_features(split, backbone, cache_dir, device=device, precision=precision, cut=cut, progress=False)
    inputs = features.activations()[:, 0] if cut is not None else features.plain
    with torch.no_grad():
        logits = torch.cat([module(batch) for batch in inputs.split(256)])
    return logits, features.labels


def mirror_val_acc(head: dict, backbone: torch.nn.Module, data_dir: Path, cache_dir: Path, device) -> float:
    """Validation accuracy of the winner with test-time augmentation (image + mirror logits).

    Both views come from the cache, so this costs one extra backbone pass over validation/ the
    first time."""
    class_to_idx = {name: i for i, name in enumerate(head["classes"])}
    logits, labels = 0, None
    for mirror in (False, True):
        split = ClothingDataset(
            data_dir / "validation", build_transforms(head["image_size"], mirror=mirror), class_to_idx
        )
        view_logits, labels = split_logits(head, backbone, split, cache_dir, device)
        logits = logits + view_logits
    return (logits.argmax(dim=1) == labels).float().mean().item()
