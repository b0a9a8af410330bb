"""Self-describing checkpoints: weights plus everything needed to use them. Written atomically; read
with `weights_only=True`, so a file from elsewhere can never run code when loaded.

Format 2, both kinds: `format_version`, `kind`, `spec` (a ModelSpec as a plain dict: classes in index
order, size_inner, dropout, finetune_blocks, image_size, mean, std), `state_dict`, `train_config`,
`metrics` and `provenance` (study, trial, MLflow run id, backbone fingerprint, ...). A `head`
checkpoint (a trial's artifact) holds the state of what the trial trained, keyed as in
`ClothingClassifierMobileNet.tail()` (`head.*`, and `blocks.*` after fine-tuning); a `model`
(what `best --export` writes) holds the whole model's. Format-1 files are read through `upgrade_v1`.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from clothing.data import shown
from clothing.model import ClothingClassifierMobileNet, ModelSpec, build_model

FORMAT_VERSION = 2
HEAD = "head"  # a trial's trained head, the sweep's per-trial artifact
MODEL = "model"  # a full model (backbone + head), what `best --export` writes


class CheckpointError(ValueError):
    """A checkpoint could not be written or is not one of ours; the message says what to do."""


def save_checkpoint(payload: dict[str, Any], path: str | Path) -> Path:
    """torch.save `payload` to `path` atomically: a temp file in the same folder, then a rename,
    so an interrupted save never leaves a half-written file under the real name."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise CheckpointError(f"folder {shown(folder)} does not exist; create it or choose another path")
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise CheckpointError(f"cannot write to {shown(folder)} ({exc.strerror}); choose a writable folder") from exc
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def checkpoint(kind: str, spec: ModelSpec, state_dict: dict, **extra: Any) -> dict[str, Any]:
    """A checkpoint payload in the current format (`extra`: train_config, metrics, provenance)."""
    return {"format_version": FORMAT_VERSION, "kind": kind, "spec": spec.to_dict(), "state_dict": state_dict, **extra}


def upgrade_v1(payload: dict[str, Any]) -> dict[str, Any]:
    """A format-1 file (loose spec keys, a head's state dict unprefixed, stage 2's blocks apart) in
    the current format: the one place that knows the old layout and its defaults."""
    spec = ModelSpec(
        classes=tuple(payload["classes"]),
        size_inner=payload["size_inner"],
        dropout=payload.get("dropout", 0.0),
        finetune_blocks=payload.get("finetune_blocks", 0),
        image_size=payload["image_size"],
        mean=tuple(payload["mean"]),
        std=tuple(payload["std"]),
    )
    state = payload["state_dict"]
    if payload["kind"] == HEAD:
        state = {f"head.{k}": v for k, v in state.items()}
        state.update({f"blocks.{k}": v for k, v in payload.get("trunk_state_dict", {}).items()})
    provenance = {k: payload[k] for k in ("study", "trial", "mlflow_run_id", "backbone_fingerprint") if k in payload}
    return checkpoint(
        payload["kind"],
        spec,
        state,
        train_config=payload.get("config", {}),
        metrics=payload.get("metrics", {}),
        provenance=provenance,
    )


def load_checkpoint(path: str | Path, kind: str | None = None) -> dict[str, Any]:
    """Load one of our checkpoints safely; anything else is a CheckpointError, never unpickled."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"model file {shown(path)} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # the safe unpickler fails in many ways on foreign bytes; all mean the same
        raise CheckpointError(
            f"{path} is not a clothing model file (it cannot be loaded safely: {type(exc).__name__}); "
            "export one with `python -m sweep best --export PATH`"
        ) from exc
    if not isinstance(payload, dict) or "format_version" not in payload or "kind" not in payload:
        raise CheckpointError(
            f"{path} is a torch file but not a clothing model; export one with `python -m sweep best --export PATH`"
        )
    if payload["format_version"] > FORMAT_VERSION:
        raise CheckpointError(f"{shown(path)} was written by a newer version of this tool; upgrade it")
    if kind is not None and payload["kind"] != kind:
        raise CheckpointError(f"{shown(path)} holds a {payload['kind']} checkpoint, not a {kind}")
    try:
        payload = upgrade_v1(payload) if payload["format_version"] == 1 else payload
        ModelSpec.from_dict(payload["spec"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(
            f"{path} is a clothing model file with missing or broken fields ({exc}); export it again "
            "with `python -m sweep best --export PATH`"
        ) from exc
    return payload


def spec_of(payload: dict[str, Any]) -> ModelSpec:
    return ModelSpec.from_dict(payload["spec"])


def load_model(path: str | Path) -> tuple[ClothingClassifierMobileNet, dict[str, Any]]:
    """Rebuild an exported full model (no network: the backbone's weights are in the file)."""
    payload = load_checkpoint(path, kind=MODEL)
    model = build_model(spec_of(payload))
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        raise CheckpointError(f"{shown(path)} does not match the model it describes: {exc}") from exc
    return model.eval(), payload
