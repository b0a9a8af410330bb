"""The MLflow model registry: the winner's exported model file logged on its run and registered as a
new version of a name, with the `champion` alias moved to it. With `sweep.tracking` and
`sweep.serving` (the served pyfunc), the only modules that import mlflow.

MLflow's model flavours and the served pyfunc are imported where a model is logged, not with this
module: they take seconds to import, and only `best --register` needs them."""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import logging
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import torch

import clothing
from clothing.checkpoint import load_checkpoint, load_model, spec_of
from sweep.tracking import Tracker

CHAMPION_ALIAS = "champion"  # `models:/NAME@champion` always loads the latest registered winner
# pyfunc: image bytes in, labels out, nothing unpickled (sweep.serving). pytorch and pt2: the nn.Module,
# as MLflow's PyTorch flavour stores it (a pickle, or torch.export's graph), taking normalised tensors.
REGISTRY_FORMATS = ("pyfunc", "pytorch", "pt2")
SERVED_MODEL_CODE = Path(__file__).with_name("serving.py")  # the models-from-code file
PACKAGES = [Path(clothing.__file__).parent, Path(__file__).parent]  # the code a registered model ships with
# What the served model imports, pinned to what this process runs: given, MLflow does not load the
# model once more to guess them.
REQUIREMENTS = ("mlflow", "torch", "torchvision", "pillow", "numpy", "pandas", "tqdm")


@dataclass(frozen=True)
class VersionInfo:
    """What a registered model version says about itself in the registry."""

    description: str
    tags: dict[str, str] = field(default_factory=dict)


def pinned_requirements() -> list[str]:
    return [f"{name}=={importlib.metadata.version(name).split('+')[0]}" for name in REQUIREMENTS]


def log_pyfunc(model_file: Path, run_id: str, model_id: str):
    """The exported file as an image-classifying pyfunc, written as a model from code."""
    import mlflow.pyfunc
    from mlflow.models import Model

    from sweep.serving import IMAGE_COLUMN, MODEL_ARTIFACT, SIGNATURE, input_example

    spec = spec_of(load_checkpoint(model_file))
    metadata = {
        "classes": list(spec.classes),
        "input": f"column `{IMAGE_COLUMN}`: the bytes of an image file (base64 in JSON), any size or mode",
        "output": "label, probability, top_k (label and probability, most likely first), error (unreadable rows)",
    }
    return Model.log(
        artifact_path=None,  # deprecated for `name`, but still positional in Model.log
        name="model",
        flavor=mlflow.pyfunc,
        run_id=run_id,
        model_id=model_id,
        python_model=str(SERVED_MODEL_CODE),
        artifacts={MODEL_ARTIFACT: str(model_file)},
        code_paths=[str(p) for p in PACKAGES],
        signature=SIGNATURE,
        input_example=input_example(),
        pip_requirements=pinned_requirements(),
        metadata=metadata,
    )


def log_pytorch(model_file: Path, run_id: str, model_id: str, serialization_format: str):
    """The exported model as MLflow's PyTorch flavour: the nn.Module, taking normalised NCHW tensors.

    "pickle" loads as the nn.Module users expect (code_paths ships the model's classes with it), and
    like any pickle it runs code when loaded. "pt2" is torch.export's graph: nothing is unpickled, the
    batch size stays dynamic, but it loads as a GraphModule."""
    import mlflow.pytorch
    from mlflow.models import infer_signature

    model, payload = load_model(model_file)
    spec = spec_of(payload)
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
    pytorch_logger = logging.getLogger("mlflow.pytorch")
    saved_level = pytorch_logger.level
    if serialization_format == "pickle":
        # Pickle is the user's explicit choice here (--register-format pytorch): MLflow's warning
        # about unpickling is in our --help and docs already, not news on every register.
        pytorch_logger.setLevel(logging.ERROR)
    try:
        return mlflow.pytorch.log_model(
            model,
            name="model",
            run_id=run_id,
            model_id=model_id,
            signature=infer_signature(example, output),
            input_example=example,
            metadata=metadata,
            serialization_format=serialization_format,
            code_paths=[str(PACKAGES[0])] if serialization_format == "pickle" else None,
        )
    finally:
        pytorch_logger.setLevel(saved_level)


def register_winner(tracker: Tracker, model_file: Path, name: str, version: VersionInfo, fmt: str = "pyfunc") -> str:
    """Log the exported winner (`model_file`, from `best --export`) on its run as an MLflow model in
    `fmt` (REGISTRY_FORMATS) and register a new version of `name`, with `version`'s description and
    tags, as the `champion`; returns the version.

    The model is logged with an explicit run id, not by reopening the run with the fluent API: that
    would end the run again and rewrite its end time (a 3 s trial would show the minutes until
    `best --register`)."""
    if fmt not in REGISTRY_FORMATS:
        raise ValueError(f"unknown registry format {fmt!r}; use one of {', '.join(REGISTRY_FORMATS)}")
    run_id = load_checkpoint(model_file)["provenance"]["mlflow_run_id"]
    mlflow.set_tracking_uri(tracker.tracking_uri)  # log_model and register_model read the global URI
    # Created here, in the run's experiment: left to itself, log_model without an active run files
    # the model under the "Default" experiment.
    experiment_id = tracker.client.get_run(run_id).info.experiment_id
    logged_model = mlflow.initialize_logged_model("model", source_run_id=run_id, experiment_id=experiment_id)
    if fmt == "pyfunc":
        info = log_pyfunc(model_file, run_id, logged_model.model_id)
    else:
        info = log_pytorch(model_file, run_id, logged_model.model_id, "pickle" if fmt == "pytorch" else "pt2")
    # register_model prints "Successfully registered ..." / "Created version ..." to stderr; `best`
    # says the same in one line of its own.
    with contextlib.redirect_stderr(io.StringIO()):
        registered = mlflow.register_model(info.model_uri, name, tags=version.tags)
    tracker.client.update_model_version(name, registered.version, description=version.description)
    tracker.client.set_registered_model_alias(name, CHAMPION_ALIAS, registered.version)
    return str(registered.version)
