"""The registered champion in use: `mlflow models serve` answers images with labels, as users run it."""

import base64
import csv
import subprocess
import sys

import pytest
import requests
from click.testing import CliRunner
from PIL import Image
from sweep_helpers import data_args, sweep
from test_mlflow_view import two_tolerances_with_different_winners

from bench.servers import model_server
from sweep.cli import cli

NAME = "clothing-served"


def request_images(files: list, top_k: int = 2) -> dict:
    """The body a client sends: one row per image, its bytes base64-encoded (MLflow's `binary`)."""
    rows = [[base64.b64encode(f.read_bytes() if hasattr(f, "read_bytes") else f).decode()] for f in files]
    return {"dataframe_split": {"columns": ["image"], "data": rows}, "params": {"top_k": top_k}}


def predicted(model_file, files, tmp_path) -> list[dict]:
    """`sweep predict --output`'s rows for `files`: what the served model must agree with."""
    out = tmp_path / f"{model_file.stem}.csv"
    result = CliRunner().invoke(cli, ["predict", str(model_file), *map(str, files), "--output", str(out)])
    assert result.exit_code == 0, result.output
    return list(csv.DictReader(out.open()))


def register(swept, tolerance, export):
    argv = ["best", "--tolerance", str(tolerance), "--register", NAME, "--export", str(export)]
    result = sweep(*argv, *data_args(swept.data_dir, swept.weights), stores=swept.stores)
    assert result.exit_code == 0, result.output


@pytest.mark.slow  # registers twice and starts `mlflow models serve`
def test_the_served_champion_answers_images_with_the_labels_predict_gives(swept, winner_restored, tmp_path):
    """Two registrations (two winners, under two tolerances) move `@champion`; a server started on the
    alias then serves the second: the labels and probabilities `predict` gives with its export, an
    error row for a file that is no image, and no traceback."""
    jpeg = sorted((swept.data_dir / "validation" / "pants").glob("*.jpg"))[0]
    png = tmp_path / "shoes.png"
    Image.open(sorted((swept.data_dir / "validation" / "shoes").glob("*.jpg"))[0]).save(png)
    files = [jpeg, png]
    body = request_images([*files, b"%PDF-1.4 not an image"])
    (first, _), (second, _) = two_tolerances_with_different_winners(swept)
    exports = {}
    for tolerance in (first, second):
        exports[tolerance] = tmp_path / f"model-{tolerance}.pt"
        register(swept, tolerance, exports[tolerance])
    expected, other = (predicted(exports[t], files, tmp_path) for t in (second, first))
    with model_server(tmp_path / "serve", f"models:/{NAME}@champion", swept.stores["--tracking-uri"]) as url:
        response = requests.post(url, json=body, timeout=120)
    assert response.status_code == 200, response.text
    rows = response.json()["predictions"]
    assert [r["label"] for r in rows[:2]] == [e["label"] for e in expected]
    served = [r["probability"] for r in rows[:2]]
    assert served == pytest.approx([float(e["probability"]) for e in expected], abs=1e-3)
    assert served != pytest.approx([float(e["probability"]) for e in other], abs=1e-4)  # not the first winner
    for row in rows[:2]:
        assert len(row["top_k"]) == 2 and row["top_k"][0]["label"] == row["label"] and row["error"] is None
        assert row["top_k"][0]["probability"] >= row["top_k"][1]["probability"]
    bad = rows[2]
    assert bad["label"] is None and bad["top_k"] == [] and bad["error"].startswith("row 2: not an image")
    assert "Traceback" not in response.text


@pytest.mark.slow  # registers three times, then loads every version in one fresh process
def test_every_registered_format_loads_in_a_fresh_process_and_only_the_pyfunc_without_pickle(exported, swept, tmp_path):
    """pyfunc (image bytes in, labels out), the pickled nn.Module and torch.export's graph, each
    registered from the winner, answer what `predict` answers; with pickle deserialisation switched
    off, the pyfunc still loads and the pickle does not."""
    name = "clothing-formats"
    for fmt in ("pyfunc", "pytorch", "pt2"):  # versions 1, 2 and 3
        argv = ["best", "--register", name, "--register-format", fmt, *data_args(swept.data_dir, swept.weights)]
        result = sweep(*argv, stores=swept.stores)
        assert result.exit_code == 0 and f"models:/{name}@champion" in result.output, result.output
    images = sorted(map(str, (swept.data_dir / "validation").rglob("*.jpg")))
    expected = [row["label"] for row in predicted(exported.path, images, tmp_path)]
    # Every image as one batch, then the first alone: the batch size is not fixed by the example.
    script = f"""
import os, mlflow, mlflow.pyfunc, mlflow.pytorch, pandas as pd, torch
from clothing.checkpoint import load_model, spec_of
from clothing.data import load_image
mlflow.set_tracking_uri({swept.stores["--tracking-uri"]!r})
spec = spec_of(load_model({str(exported.path)!r})[1])
batch = torch.stack([spec.transform()(load_image(p)) for p in {images!r}])
for version in (2, 3):
    model = mlflow.pytorch.load_model("models:/{name}/" + str(version))
    if version == 2:
        model.eval()  # the pickled nn.Module; torch.export's graph was traced in eval mode already
    with torch.no_grad():
        labels = [spec.classes[i] for i in model(batch).argmax(1).tolist()]
        first = spec.classes[model(batch[:1]).argmax(1).item()]
    print(type(model).__name__, " ".join(labels), first)
os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = "false"
served = mlflow.pyfunc.load_model("models:/{name}/1")
frame = pd.DataFrame({{"image": [open(p, "rb").read() for p in {images!r}]}})
print("pyfunc", " ".join(served.predict(frame, params={{"top_k": 1}})["label"]))
try:
    mlflow.pytorch.load_model("models:/{name}/2")
    print("pickle loaded")
except Exception as exc:
    print("pickle refused:", type(exc).__name__)
"""
    fresh = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    pickled, graph, pyfunc, pickle_line = fresh.stdout.splitlines()[-4:]
    for line, kind in ((pickled, "ClothingClassifierMobileNet"), (graph, "GraphModule")):
        loaded, *labels, first = line.split()
        assert loaded == kind and labels == expected and first == expected[0], line
    assert pyfunc.split()[1:] == expected
    assert pickle_line == "pickle refused: MlflowException"  # the switch is on: only the pyfunc loads
