"""A trial's checkpoint (an MLflow artifact) + the backbone -> the full model: a self-contained
model.pt, a registered MLflow model, or logits over a split (scores, TTA)."""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import torch

import clothing
from clothing.checkpoint import HEAD, MODEL, CheckpointError, checkpoint, load_checkpoint, save_checkpoint, spec_of
from clothing.data import ClothingDataset, build_transforms
from clothing.engines import engine_runs
from clothing.extract import ExtractionOptions
from clothing.features import FeatureSet, cached_features
from clothing.model import LAST_CONV, ClothingClassifierMobileNet, build_model, weights_fingerprint
from sweep.select import TrialRecord
from sweep.tracking import LoggedModel, Tracker, VersionInfo

CHECKPOINT_ARTIFACT = "checkpoint/head.pt"


def fetch_head(tracker: Tracker, record: TrialRecord) -> dict:
    """The trial's checkpoint (its head, and for stage 2 its fine-tuned blocks), from its MLflow run."""
    if not record.run_id:
        raise CheckpointError(f"{record.name} has no MLflow run to take its checkpoint from")
    with tempfile.TemporaryDirectory() as tmp:
        return load_checkpoint(tracker.download(record.run_id, CHECKPOINT_ARTIFACT, tmp), kind=HEAD)


def check_backbone(head: dict, backbone: torch.nn.Module) -> None:
    if weights_fingerprint(backbone) != head["provenance"]["backbone_fingerprint"]:
        raise CheckpointError(
            "the winner was trained on other backbone weights than the ones given; pass the same "
            "--backbone-weights (or CLOTHING_BACKBONE_WEIGHTS) as for `sweep run`"
        )


def model_from_checkpoint(head: dict, backbone: torch.nn.Module) -> ClothingClassifierMobileNet:
    """The full model: the given backbone's trunk with what the trial trained loaded into its tail
    (the head, and after fine-tuning the last blocks, on a copy: the caller's backbone keeps serving
    the feature cache)."""
    check_backbone(head, backbone)
    spec = spec_of(head)
    model = build_model(spec, copy.deepcopy(backbone) if spec.finetune_blocks else backbone)
    model.tail().load_state_dict(head["state_dict"])
    # On the CPU, whatever device the backbone was last used on (extraction moves it to --device):
    # exports and registered models are CPU artifacts, and split_logits feeds it cached CPU tensors.
    return model.cpu().eval()


def export_model(head: dict, backbone: torch.nn.Module, path: str | Path, metrics: dict) -> Path:
    """Write the winner as a full model in the export format (see clothing.checkpoint), atomically."""
    model = model_from_checkpoint(head, backbone)
    payload = checkpoint(
        MODEL,
        spec_of(head),
        model.state_dict(),
        train_config=head["train_config"],
        metrics=metrics,
        provenance=head["provenance"],
    )
    return save_checkpoint(payload, path)


def register_winner(
    tracker: Tracker, head: dict, backbone: torch.nn.Module, name: str, version: VersionInfo, fmt: str = "pickle"
) -> str:
    """Log the winner's full model on its run as an MLflow PyTorch model and register a version of `name`."""
    model, spec = model_from_checkpoint(head, backbone), spec_of(head)
    size = spec.image_size
    # Two normalised images, NCHW float32: pt2 keeps the batch dimension dynamic only when the
    # example's batch is larger than 1.
    example = torch.zeros(2, 3, size, size).numpy()
    metadata = {
        "classes": list(spec.classes),
        "preprocessing": f"RGB, Resize(({size}, {size})), ToTensor, Normalize(mean, std); input NCHW float32",
        "image_size": size,
        "mean": list(spec.mean),
        "std": list(spec.std),
        "output": "logits, one per class in `classes` order",
    }
    code = [str(Path(clothing.__file__).parent)] if fmt == "pickle" else None
    logged = LoggedModel(example, metadata, fmt, code)
    return tracker.register_model(head["provenance"]["mlflow_run_id"], model, name, version, logged)


def split_logits(
    head: dict, backbone: torch.nn.Module, split: ClothingDataset, cache_dir: Path, device, precision: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) of the checkpoint over a split, from cached features, or for a fine-tuned
    checkpoint from the activations cached at its cut: the frozen trunk runs at most once per split.
    The features are extracted as the trial's were (precision and engine), unless `precision` says
    otherwise."""
    precision = precision or head["provenance"].get("feature_precision", "auto")
    engine = head["provenance"].get("feature_engine", "torch")  # checkpoints from before engines: torch
    if not engine_runs(engine, torch.device(device)):  # e.g. scored on a GPU: the same features up to rounding
        engine = "auto"
    model = model_from_checkpoint(head, backbone)
    # The tail takes activations at the cut; without fine-tuning the cache holds pooled features.
    cut = model.cut if spec_of(head).finetune_blocks else None
    options = ExtractionOptions(device=str(device), precision=precision, engine=engine, cut=cut, progress=False)
    features = cached_features(split, backbone, cache_dir, options)
    return cached_logits(model, features), features.labels


def cached_logits(model: ClothingClassifierMobileNet, features: FeatureSet) -> torch.Tensor:
    """The model's logits over the plain view of cached features: its head on the pooled features, or
    after fine-tuning its tail on the activations at its cut (from a deeper cut's cache if need be)."""
    if model.cut <= LAST_CONV:
        module, inputs = model.tail(), features.activations_at(model.cut, model.features, view=0)
    else:
        module, inputs = model.head, features.plain
    with torch.no_grad():
        return torch.cat([module(batch.float()) for batch in inputs.split(256)])


def split_accuracy(head: dict, backbone: torch.nn.Module, folder: Path, cache_dir: Path, device) -> float:
    """The checkpoint's accuracy on the images of one split folder (e.g. test/)."""
    spec = spec_of(head)
    split = ClothingDataset(folder, spec.transform(), {c: i for i, c in enumerate(spec.classes)})
    logits, labels = split_logits(head, backbone, split, cache_dir, device)
    return (logits.argmax(dim=1) == labels).float().mean().item()


def mirror_val_acc(head: dict, backbone: torch.nn.Module, data_dir: Path, cache_dir: Path, device) -> float:
    """Validation accuracy of the winner with test-time augmentation (image + mirror logits).

    Both views come from the cache, so this costs one extra backbone pass over validation/ the
    first time."""
    spec = spec_of(head)
    class_to_idx = {name: i for i, name in enumerate(spec.classes)}
    logits, labels = 0, None
    for mirror in (False, True):
        transform = build_transforms(spec.image_size, mirror=mirror, mean=spec.mean, std=spec.std)
        split = ClothingDataset(data_dir / "validation", transform, class_to_idx)
        view_logits, labels = split_logits(head, backbone, split, cache_dir, device)
        logits = logits + view_logits
    return (logits.argmax(dim=1) == labels).float().mean().item()
