"""The MLflow model registry: the winner's full model logged on its run and registered as a new
version of a name, with the `champion` alias moved to it. Beside `sweep.tracking`, the only other
module that imports mlflow."""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

import mlflow
import mlflow.pytorch
import torch
from mlflow.models import infer_signature

import clothing
from clothing.checkpoint import spec_of
from clothing.scoring import model_from_checkpoint
from sweep.summary import VersionInfo
from sweep.tracking import Tracker

CHAMPION_ALIAS = "champion"  # `models:/NAME@champion` always loads the latest registered winner
REGISTRY_FORMATS = ("pickle", "pt2")  # mlflow.pytorch serialization formats `best --register` offers


def register_winner(
    tracker: Tracker, head: dict, backbone: torch.nn.Module, name: str, version: VersionInfo, fmt: str = "pickle"
) -> str:
    """Log the winner's full model on its run as an MLflow PyTorch model and register a new version of
    `name`, with `version`'s description and tags, as the `champion`; returns the version.

    "pickle" loads as the nn.Module users expect (code_paths ships the model's classes with it), and
    like any pickle it runs code when loaded. "pt2" is torch.export's graph: nothing is unpickled, the
    batch size stays dynamic, but it loads as a GraphModule.

    The model is logged with an explicit run id, not by reopening the run with the fluent API: that
    would end the run again and rewrite its end time (a 3 s trial would show the minutes until
    `best --register`)."""
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
    with torch.no_grad():
        output = model(torch.from_numpy(example)).numpy()
    run_id = head["provenance"]["mlflow_run_id"]
    mlflow.set_tracking_uri(tracker.tracking_uri)  # log_model and register_model read the global URI
    pytorch_logger = logging.getLogger("mlflow.pytorch")
    saved_level = pytorch_logger.level
    if fmt == "pickle":
        # Pickle is the user's explicit choice here (--register-format; pt2 is the other): MLflow's
        # warning about unpickling is in our --help and docs already, not news on every register.
        pytorch_logger.setLevel(logging.ERROR)
    try:
        # Created here, in the run's experiment: left to itself, log_model without an active run
        # files the model under the "Default" experiment.
        experiment_id = tracker.client.get_run(run_id).info.experiment_id
        logged_model = mlflow.initialize_logged_model("model", source_run_id=run_id, experiment_id=experiment_id)
        info = mlflow.pytorch.log_model(
            model,
            name="model",
            run_id=run_id,
            model_id=logged_model.model_id,
            signature=infer_signature(example, output),
            input_example=example,
            metadata=metadata,
            serialization_format=fmt,
            code_paths=[str(Path(clothing.__file__).parent)] if fmt == "pickle" else None,
        )
        # register_model prints "Successfully registered ..." / "Created version ..." to stderr;
        # `best` says the same in one line of its own.
        with contextlib.redirect_stderr(io.StringIO()):
            registered = mlflow.register_model(info.model_uri, name, tags=version.tags)
    finally:
        pytorch_logger.setLevel(saved_level)
    tracker.client.update_model_version(name, registered.version, description=version.description)
    tracker.client.set_registered_model_alias(name, CHAMPION_ALIAS, registered.version)
    return str(registered.version)
