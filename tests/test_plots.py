"""What users look at: plots in MLflow, the trials table, and a registered winner."""

import csv
import io
import json

import pytest
from sweep_helpers import load_study, mlflow_runs, sweep


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
    header = table[0].split()
    assert header[-2:] == ["mlflow_run_id", "mlflow_model_id"]
    val_accs = [r["val_acc"] for r in sorted(as_json, key=lambda r: -r["val_acc"])]
    column = header.index("val_acc") - len(header)  # counted from the right: a starred row has one more field
    assert [float(line.split()[column]) for line in table[1:]] == pytest.approx(val_accs, abs=1e-3)
    assert {line.split()[-1] for line in table[1:]} == {r["mlflow_model_id"] for r in as_json}
