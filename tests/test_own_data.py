"""Any image-folder data set, end to end: other class names, count, image modes and sizes."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from sweep_helpers import data_args, output_of, stores_in, sweep

from bench.images import styled_pixels
from clothing.checkpoint import load_model, spec_of
from sweep.cli import cli

# Three classes named by words with spaces; their pictures are the styled patterns 0, 1 and 2.
OWN_CLASSES = ("blue jeans", "rain coat", "summer hat")
MODES = ("L", "RGBA", "RGB")  # grey PNGs, PNGs with transparency, and JPEGs


def write_own_split(root, per_class: int, seed: int):
    """root/<class>/NN.(png|jpg): 40x30 px images, each third grey, RGBA or RGB."""
    for cls, name in enumerate(OWN_CLASSES):
        for i in range(per_class):
            rng = np.random.default_rng(seed + 100 * cls + i)
            image = Image.fromarray(styled_pixels(cls, rng)).resize((40, 30)).convert(MODES[i % 3])
            path = root / name / f"{i:02d}.{'jpg' if image.mode == 'RGB' else 'png'}"
            path.parent.mkdir(parents=True, exist_ok=True)
            image.save(path)
    return root


@pytest.mark.slow  # the recipe's two stages, then the registered model in a fresh process
def test_the_recipe_runs_on_your_own_image_folders(tmp_path, tiny_weights):
    data = tmp_path / "my-images"
    write_own_split(data / "train", per_class=9, seed=0)
    write_own_split(data / "validation", per_class=6, seed=5000)
    stores = stores_in(tmp_path / "runs")
    fewer = ("--trials", "3", "--epochs", "3", "--finetune-epochs", "2", "--precision", "fp32", "--quiet")
    result = sweep("run", *fewer, *data_args(data, tiny_weights), stores=stores)  # the defaults: the recipe
    assert result.exit_code == 0, output_of(result)
    assert "finetune-000" in result.output  # the recipe's stage 2 ran too

    model_file = tmp_path / "model.pt"
    argv = ["best", "--export", str(model_file), "--register", "my-classifier", *data_args(data, tiny_weights)]
    result = sweep(*argv, stores=stores)
    assert result.exit_code == 0, output_of(result)
    _, payload = load_model(model_file)
    assert spec_of(payload).classes == OWN_CLASSES

    out = tmp_path / "predictions.csv"
    predicted = CliRunner().invoke(cli, ["predict", str(model_file), str(data / "validation"), "--output", str(out)])
    assert predicted.exit_code == 0, predicted.output
    rows = list(csv.DictReader(out.open(encoding="utf-8")))
    assert len(rows) == 3 * 6 and all(r["error"] == "" for r in rows)
    assert {r["label"] for r in rows} <= set(OWN_CLASSES)
    assert all(set(json.loads(r["top_k"])) == set(OWN_CLASSES) for r in rows)  # top 3 of 3 classes
    correct = sum(r["label"] == os.path.basename(os.path.dirname(r["path"])) for r in rows)
    assert correct > len(rows) / 3, "the model should beat chance on its own classes"

    # The registered model, loaded as a server loads it, answers with the same class names.
    script = f"""
import json, mlflow.pyfunc, pandas as pd
mlflow.set_tracking_uri({stores["--tracking-uri"]!r})
model = mlflow.pyfunc.load_model("models:/my-classifier@champion")
frame = pd.DataFrame({{"image": [open(p, "rb").read() for p in {[r["path"] for r in rows]!r}]}})
print(json.dumps(list(model.predict(frame)["label"])))
"""
    env = {**os.environ, "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false"}
    fresh = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert json.loads(fresh.stdout.splitlines()[-1]) == [r["label"] for r in rows]
