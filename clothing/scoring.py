"""A trial's checkpoint + the backbone -> the full model, and that model scored on a split.

Library work, like pytorch/examples' `validate`: `validate` returns a dict of metrics and knows
nothing of Optuna or MLflow. Scores come from cached features (or, for a fine-tuned checkpoint, from
the activations cached at its cut), so the frozen trunk runs at most once per split.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from clothing.checkpoint import MODEL, CheckpointError, checkpoint, save_checkpoint, spec_of
from clothing.data import ClothingDataset, build_transforms
from clothing.engines import engine_runs
from clothing.extract import ExtractionOptions
from clothing.features import FeatureSet, cached_features
from clothing.model import LAST_CONV, ClothingClassifierMobileNet, build_model, weights_fingerprint
from clothing.predict import mirror_tta


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


def split_logits(  # noqa: PLR0913 - the checkpoint, the split and how its features are made
    head: dict,
    backbone: torch.nn.Module,
    split: ClothingDataset,
    cache_dir: Path,
    device,
    precision: str | None = None,
    tta: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) of the checkpoint over a split, from cached features, or for a fine-tuned
    checkpoint from the activations cached at its cut; with `tta`, the mean with the mirror images'
    logits (the cache's view 1). The features are extracted as the trial's were (precision and
    engine), unless `precision` says otherwise."""
    precision = precision or head["provenance"].get("feature_precision", "auto")
    engine = head["provenance"].get("feature_engine", "torch")  # checkpoints from before engines: torch
    if not engine_runs(engine, torch.device(device)):  # e.g. scored on a GPU: the same features up to rounding
        engine = "auto"
    model = model_from_checkpoint(head, backbone)
    # The tail takes activations at the cut; without fine-tuning the cache holds pooled features.
    spec = spec_of(head)
    options = ExtractionOptions(
        device=str(device),
        precision=precision,
        engine=engine,
        views=2 if tta else 1,
        cut=model.cut if spec.finetune_blocks else None,
        image_size=spec.image_size,
        progress=False,
    )
    features = cached_features(split, backbone, cache_dir, options)
    if tta:
        return mirror_tta(lambda mirrored: cached_logits(model, features, int(mirrored))), features.labels
    return cached_logits(model, features), features.labels


def cached_logits(model: ClothingClassifierMobileNet, features: FeatureSet, view: int = 0) -> torch.Tensor:
    """The model's logits over one cached view (0: the plain images; 1: their mirror, with views >= 2):
    its head on the pooled features, or after fine-tuning its tail on the activations at its cut."""
    if model.cut <= LAST_CONV:
        if features.cut != model.cut:
            raise ValueError(f"the activations were cached at cut {features.cut}, the model trains from {model.cut}")
        module, inputs = model.tail(), features.activations()[:, view]
    else:
        module, inputs = model.head, features.features[:, view]
    with torch.no_grad():
        return torch.cat([module(batch.float()) for batch in inputs.split(256)])


def validate(
    head: dict, backbone: torch.nn.Module, folder: Path, cache_dir: Path, device, tta: bool = False
) -> dict[str, float]:
    """The checkpoint's accuracy on the images of one split folder: {"acc", "images"}. With `tta` the
    logits of each image and of its mirror image are averaged (both views come from the cache, so the
    mirror costs one extra backbone pass over the folder the first time)."""
    spec = spec_of(head)
    class_to_idx = {name: i for i, name in enumerate(spec.classes)}
    transform = build_transforms(spec.image_size, mean=spec.mean, std=spec.std)
    split = ClothingDataset(folder, transform, class_to_idx)
    logits, labels = split_logits(head, backbone, split, cache_dir, device, tta=tta)
    return {"acc": (logits.argmax(dim=1) == labels).float().mean().item(), "images": len(labels)}
