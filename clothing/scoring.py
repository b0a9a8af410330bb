"""A trial's checkpoint + the backbone -> the full model, and that model scored on image files.

Library work, like pytorch/examples' `validate`: it returns numbers and knows nothing of Optuna or
MLflow. A score runs the model as `sweep predict` runs the exported file (clothing.inference), not
through the feature cache, whose precision and engine may differ from the shipped model's.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from clothing.checkpoint import MODEL, CheckpointError, checkpoint, save_checkpoint, spec_of
from clothing.data import ClothingDataset
from clothing.features import BadImagesError
from clothing.inference import BatchOptions, predict_files
from clothing.model import ClothingClassifierMobileNet, ModelSpec, build_model, weights_fingerprint


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
    # exports and registered models are CPU artifacts.
    return model.cpu().eval()


def export_model(head: dict, model: ClothingClassifierMobileNet, path: str | Path, metrics: dict) -> Path:
    """Write the winner, rebuilt as `model` (model_from_checkpoint), as a full model in the export
    format (see clothing.checkpoint), atomically."""
    payload = checkpoint(
        MODEL,
        spec_of(head),
        model.state_dict(),
        train_config=head["train_config"],
        metrics=metrics,
        provenance=head["provenance"],
    )
    return save_checkpoint(payload, path)


def predicted_right(
    model: ClothingClassifierMobileNet, spec: ModelSpec, paths: list[str], labels: list[int], options: BatchOptions
) -> list[int]:
    """1 for each image the model labels right, else 0, exactly as `sweep predict` labels the files
    with the exported model (decoded files, fp32, the engine `auto` picks for that many images): the
    figure a command prints for a model is what the shipped file does. An unreadable image is an error."""
    results = list(predict_files(model, spec, paths, options))
    unreadable = [r.path for r in results if r.error]
    if unreadable:
        raise BadImagesError(unreadable)
    return [int(r.top_k[0][0] == spec.classes[label]) for r, label in zip(results, labels)]


def folder_accuracy(model: ClothingClassifierMobileNet, spec: ModelSpec, folder: Path, options: BatchOptions) -> float:
    """The model's accuracy on the images of one split folder (one sub-folder per class), as `predict`
    labels them with these options (`tta`: `predict --tta`)."""
    split = ClothingDataset(folder, class_to_idx={name: i for i, name in enumerate(spec.classes)})
    right = predicted_right(model, spec, split.image_paths, split.labels, options)
    return sum(right) / len(right)
