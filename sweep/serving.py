"""The registered champion as MLflow serves it: a pyfunc that takes image bytes and answers labels.

Logged as MLflow's "models from code": this file is the code file (MLflow runs it to get the model,
`set_model` at its end), the exported `weights_only` model file the one artifact, so loading it runs
this project's code and unpickles nothing: it loads with MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false.
The scoring server base64-decodes the `image` column (MLflow's `binary` type) before `predict` sees
it. Importing this module elsewhere (sweep.registry does, for the signature) only sets the model
MLflow would take from it.
"""

from __future__ import annotations

import io

import mlflow.pyfunc
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature, set_model
from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema
from mlflow.types.schema import Array, Object, Property
from PIL import Image

from clothing.checkpoint import load_model, spec_of
from clothing.data import try_image
from clothing.predict import top_k

MODEL_ARTIFACT = "model"  # the exported model file, in the pyfunc's artifacts
IMAGE_COLUMN = "image"
DEFAULT_TOP_K = 3
CHUNK = 32  # images a forward pass takes at most: a large request never holds all its tensors at once
OUTPUT_COLUMNS = ("label", "probability", "top_k", "error")

SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec(DataType.binary, IMAGE_COLUMN)]),
    outputs=Schema(
        [
            ColSpec(DataType.string, "label", required=False),
            ColSpec(DataType.double, "probability", required=False),
            ColSpec(
                Array(Object([Property("label", DataType.string), Property("probability", DataType.double)])),
                "top_k",
            ),
            ColSpec(DataType.string, "error", required=False),
        ]
    ),
    params=ParamSchema([ParamSpec("top_k", DataType.long, DEFAULT_TOP_K)]),
)


def example_image() -> bytes:
    """A small PNG for the logged input example: enough to show a caller the request's shape."""
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (128, 96, 64)).save(buffer, format="PNG")
    return buffer.getvalue()


def input_example() -> tuple[pd.DataFrame, dict]:
    return pd.DataFrame({IMAGE_COLUMN: [example_image()]}), {"top_k": DEFAULT_TOP_K}


def decode(value: object, row: int) -> tuple[Image.Image | None, str]:
    """(the row's image, "") or (None, why it is not one)."""
    if not isinstance(value, bytes | bytearray):
        return None, f"row {row}: expected the bytes of an image file, got {type(value).__name__}"
    image, error = try_image(io.BytesIO(value))
    if image is None:
        # Pillow's message names the BytesIO object, which tells the caller nothing: its kind does.
        return None, f"row {row}: not an image Pillow can read ({type(error.__cause__).__name__})"
    return image, ""


class ImageClassifier(mlflow.pyfunc.PythonModel):
    """Rows of image bytes -> label, probability, top-k and error per row; an unreadable row gets an
    error and no label, and the other rows are still answered."""

    def load_context(self, context) -> None:
        self.model, payload = load_model(context.artifacts[MODEL_ARTIFACT])
        self.spec = spec_of(payload)
        self.transform = self.spec.transform()

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        k = int((params or {}).get("top_k", DEFAULT_TOP_K))
        if k < 1:
            raise MlflowException.invalid_parameter_value(f"top_k is {k}; it must be at least 1")
        decoded = [decode(value, row) for row, value in enumerate(model_input[IMAGE_COLUMN])]
        readable = [image for image, _ in decoded if image is not None]
        predictions = []
        for start in range(0, len(readable), CHUNK):
            chunk = readable[start : start + CHUNK]
            predictions.extend(top_k(self.model, chunk, self.transform, self.spec.classes, k))
        answers = iter(predictions)
        rows = [answer_row(next(answers) if image is not None else None, error) for image, error in decoded]
        # object columns: an error row's label and probability are JSON nulls, not NaN
        return pd.DataFrame({c: pd.Series([r[c] for r in rows], dtype=object) for c in OUTPUT_COLUMNS})


def answer_row(prediction, error: str) -> dict:
    if prediction is None:
        return {"label": None, "probability": None, "top_k": [], "error": error}
    label, probability = prediction[0]
    top = [{"label": name, "probability": p} for name, p in prediction]
    return {"label": label, "probability": probability, "top_k": top, "error": None}


set_model(ImageClassifier())
