"""The registered champion in use: `mlflow models serve` answers images with labels, as users run it."""

import base64
import csv
import os
import subprocess
import sys

import pytest
import requests
from click.testing import CliRunner
from PIL import Image
from servers import model_server
from sweep_helpers import data_args, sweep
from test_mlflow_view import two_tolerances_with_different_winners

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


@pytest.mark.slow  # registers twice and starts `mlflow models serve` twice
def test_the_served_champion_answers_images_with_the_labels_predict_gives(swept, winner_restored, tmp_path):
    jpeg = sorted((swept.data_dir / "validation" / "pants").glob("*.jpg"))[0]
    png = tmp_path / "shoes.png"
    Image.open(sorted((swept.data_dir / "validation" / "shoes").glob("*.jpg"))[0]).save(png)
    files = [jpeg, png]
    body = request_images([*files, b"%PDF-1.4 not an image"])
    tracking = swept.stores["--tracking-uri"]
    (first, _), (second, _) = two_tolerances_with_different_winners(swept)

    answers = {}
    for tolerance in (first, second):
        export = tmp_path / f"model-{tolerance}.pt"
        register(swept, tolerance, export)
        expected = predicted(export, files, tmp_path)
        # A fresh server each time, like a deployment restarted after the alias moved.
        with model_server(tmp_path / "serve", f"models:/{NAME}@champion", tracking) as url:
            response = requests.post(url, json=body, timeout=120)
        assert response.status_code == 200, response.text
        rows = response.json()["predictions"]
        assert [r["label"] for r in rows[:2]] == [e["label"] for e in expected]
        assert [r["probability"] for r in rows[:2]] == pytest.approx(
            [float(e["probability"]) for e in expected], abs=1e-3
        )
        for row in rows[:2]:
            assert len(row["top_k"]) == 2 and row["top_k"][0]["label"] == row["label"] and row["error"] is None
            assert row["top_k"][0]["probability"] >= row["top_k"][1]["probability"]
        bad = rows[2]
        assert bad["label"] is None and bad["top_k"] == [] and bad["error"].startswith("row 2: not an image")
        assert "Traceback" not in response.text
        answers[tolerance] = [r["probability"] for r in rows[:2]]
    # The second server answered with the second winner: its probabilities are the second export's.
    assert answers[first] != pytest.approx(answers[second], abs=1e-4)


@pytest.mark.slow  # loads the registered model in a fresh process
def test_the_registered_champion_loads_with_pickle_deserialisation_disabled(exported, swept, tmp_path):
    name = "clothing-no-pickle"
    for fmt in ("pyfunc", "pytorch"):
        argv = ["best", "--register", name, "--register-format", fmt, *data_args(swept.data_dir, swept.weights)]
        assert sweep(*argv, stores=swept.stores).exit_code == 0
    images = sorted((swept.data_dir / "validation").rglob("*.jpg"))
    expected = [row["label"] for row in predicted(exported.path, images, tmp_path)]
    script = f"""
import mlflow, mlflow.pyfunc, mlflow.pytorch, pandas as pd
mlflow.set_tracking_uri({swept.stores["--tracking-uri"]!r})
model = mlflow.pyfunc.load_model("models:/{name}/1")
frame = pd.DataFrame({{"image": [open(p, "rb").read() for p in {list(map(str, images))!r}]}})
print(" ".join(model.predict(frame, params={{"top_k": 1}})["label"]))
try:
    mlflow.pytorch.load_model("models:/{name}/2")  # the pickle of --register-format pytorch
    print("pickle loaded")
except Exception as exc:
    print("pickle refused:", type(exc).__name__)
"""
    env = {**os.environ, "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false"}
    fresh = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    labels, pickle_line = fresh.stdout.splitlines()[-2:]
    assert labels.split() == expected
    assert pickle_line == "pickle refused: MlflowException"  # the switch is on: only the pyfunc loads
