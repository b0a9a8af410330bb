"""What users look at: plots in MLflow, the trials table, and a registered winner."""

import csv
import io
import json
import subprocess
import sys

import pytest
from click.testing import CliRunner
from sweep_helpers import load_study, mlflow_runs, sweep

from sweep.cli import cli


def artifact_sizes(client, run_id, folder):
    return {a.path: a.file_size for a in client.list_artifacts(run_id, folder)}


def test_plots_are_logged_on_the_parent_and_every_trial(swept):
    client, runs = mlflow_runs(swept.stores)
    parent = next(r for r in runs if r.data.tags.get("sweep.role") == "study")
    plots = artifact_sizes(client, parent.info.run_id, "plots")
    for name in ("winner_rule.png", "lr_by_size_inner.png", "optimization_history.png", "param_importances.png"):
        assert plots.get(f"plots/{name}", 0) > 1000, plots
    for child in (r for r in runs if r.data.tags.get("sweep.role") == "trial"):
        assert artifact_sizes(client, child.info.run_id, "plots").get("plots/curves.png", 0) > 1000


def test_the_trials_command_agrees_with_the_study_in_every_format(swept):
    study = load_study(swept.stores)
    expected = {
        f"trial-{t.number:03d}": (t.state.name, t.params["lr"], t.user_attrs["mlflow_run_id"]) for t in study.trials
    }

    as_json = json.loads(sweep("trials", "--format", "json", stores=swept.stores).output)
    assert {r["trial"]: (r["state"], r["lr"], r["mlflow_run_id"]) for r in as_json} == expected
    assert sum(r["winner"] for r in as_json) == 1

    as_csv = list(csv.DictReader(io.StringIO(sweep("trials", "--format", "csv", stores=swept.stores).output)))
    assert {r["trial"]: (r["state"], float(r["lr"]), r["mlflow_run_id"]) for r in as_csv} == expected
    assert [r["winner"] for r in as_csv].count("True") == 1

    table = sweep("trials", "--sort", "val_acc", "--wide", stores=swept.stores).output.splitlines()  # with run ids
    assert len(table) == 1 + len(expected)
    starred = [line for line in table if line.startswith("* ")]
    winner = next(r for r in as_json if r["winner"])
    assert len(starred) == 1 and winner["mlflow_run_id"] in starred[0]
    val_accs = [r["val_acc"] for r in sorted(as_json, key=lambda r: -r["val_acc"])]
    assert [float(line.split()[-3]) for line in table[1:]] == pytest.approx(val_accs, abs=1e-3)  # val_acc column


@pytest.mark.slow  # registers, then loads the model in a fresh process
@pytest.mark.parametrize("fmt", ["pytorch", "pt2"])
def test_a_registered_winner_loads_in_a_fresh_process_and_agrees_with_the_export(fmt, swept, tmp_path):
    out, name = tmp_path / "model.pt", f"clothing-head-{fmt}"
    result = sweep(
        "best",
        "--export",
        str(out),
        "--register",
        name,
        "--register-format",
        fmt,
        "--backbone-weights",
        swept.weights,
        stores=swept.stores,
    )
    assert result.exit_code == 0, result.output
    assert f"models:/{name}/1" in result.output
    images = sorted(str(p) for p in (swept.data_dir / "validation").rglob("*.jpg"))
    exported = CliRunner().invoke(cli, ["predict", str(out), *images, "--top-k", "1"]).output.splitlines()
    exported_labels = [line.split()[1] for line in exported[1::2]]

    # Every image as one batch, then the first alone: the batch size is not fixed by the example.
    script = f"""
import mlflow.pytorch, torch
from clothing.checkpoint import load_model, spec_of
from clothing.data import load_image
mlflow.set_tracking_uri({swept.stores["--tracking-uri"]!r})
model = mlflow.pytorch.load_model("models:/{name}/1")
print(type(model).__name__)
if {fmt!r} == "pytorch":
    model.eval()  # an exported graph was traced in eval mode already
_, payload = load_model({str(out)!r})
transform = spec_of(payload).transform()
batch = torch.stack([transform(load_image(p)) for p in {images!r}])
with torch.no_grad():
    print(" ".join(spec_of(payload).classes[i] for i in model(batch).argmax(1).tolist()))
    print(spec_of(payload).classes[model(batch[:1]).argmax(1).item()])
"""
    fresh = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    kind, labels, first = fresh.stdout.splitlines()[-3:]
    assert kind == {"pytorch": "ClothingClassifierMobileNet", "pt2": "GraphModule"}[fmt]
    assert labels.split() == exported_labels and first == exported_labels[0]
