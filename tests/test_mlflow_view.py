"""What a user of MLflow's UI sees, read through the same MlflowClient/REST data the UI reads: the
experiment's kind and description, a parent run that summarises the study, pruned trials that say so,
summary metrics apart from the curves, and a registry version that describes itself."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from click.testing import CliRunner
from mlflow import MlflowClient
from sweep_helpers import (
    assert_one_error,
    data_args,
    load_study,
    mlflow_runs,
    output_of,
    run_options,
    sweep,
    sweep_argv,
    trial_records,
)

from bench.images import make_split
from clothing.model import load_backbone
from sweep.cli import cli
from sweep.ranking import select_winner
from sweep.tracking import Tracker


def parent_of(runs):
    (parent,) = [r for r in runs if r.data.tags.get("sweep.role") == "study"]
    return parent


def test_the_experiment_opens_on_the_training_runs_view_with_a_description(swept):
    client = MlflowClient(swept.stores["--tracking-uri"])
    experiment = client.get_experiment_by_name("clothing")
    # MLflow 3's UI shows an experiment without this tag as a GenAI one (an empty overview).
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert "trial-NNN" in experiment.tags["mlflow.note.content"]


def test_the_parent_run_summarises_the_study_in_metrics_description_and_params(swept):
    _, runs = mlflow_runs(swept.stores)
    parent = parent_of(runs)
    records = trial_records(swept.stores)
    winner = select_winner(records, 0.02)  # the plain sweep's tolerance
    states = [r.state for r in records]
    metrics = parent.data.metrics
    assert metrics["trials/complete"] == states.count("COMPLETE") > 0
    assert metrics["trials/pruned"] == states.count("PRUNED") > 0  # the fixture prunes some
    assert metrics["trials/failed"] == states.count("FAIL")
    assert metrics["trials/finished"] == swept.trials
    assert metrics["study/best_val_acc"] == max(r.val_acc for r in records if r.state == "COMPLETE")
    assert metrics["winner/trial"] == winner.number
    assert metrics["winner/val_acc"] == pytest.approx(winner.val_acc)
    assert metrics["winner/gap"] == pytest.approx(winner.gap)

    description = parent.data.tags["mlflow.note.content"]
    assert f"**Winner: {winner.name}**" in description
    assert "smallest gap" in description and "`lr`: log-uniform" in description and "stage 1" in description
    params = parent.data.params
    assert (params["trials"], params["epochs"], params["views"]) == (str(swept.trials), "6", "1")
    assert "space.dropout" not in params and params["space.size_inner"] == "one of (10, 100, 1000)"
    assert {"finetune_blocks", "finetune_epochs", "finetune_lr"} <= set(params)


def test_pruned_trials_say_pruned_in_a_tag_a_user_can_filter_on_and_in_their_description(swept):
    client, runs = mlflow_runs(swept.stores)
    trials = load_study(swept.stores).trials
    pruned_in_optuna = {t.user_attrs["mlflow_run_id"] for t in trials if t.state.name == "PRUNED"}
    experiment = client.get_experiment_by_name("clothing").experiment_id
    found = client.search_runs([experiment], filter_string="tags.`sweep.state` = 'PRUNED'")
    assert pruned_in_optuna and {r.info.run_id for r in found} == pruned_in_optuna
    for run in found:
        assert run.data.tags["mlflow.note.content"].startswith("**Pruned**")
        assert "pruned at epoch" in run.data.tags["mlflow.note.content"]
    complete = client.search_runs([experiment], filter_string="tags.`sweep.state` = 'COMPLETE'")
    assert all("mlflow.note.content" not in r.data.tags for r in complete)


def test_summary_metrics_are_named_apart_from_the_per_epoch_curves(swept):
    client, runs = mlflow_runs(swept.stores)
    for run in (r for r in runs if r.data.tags.get("sweep.role") == "trial"):
        single = {k for k in run.data.metrics if k.startswith("best/")}
        assert {"best/epoch", "best/val_acc", "best/train_acc", "best/gap"} <= single
        for name in single - {"best/test_acc", "best/val_acc_tta"}:  # what each `best` measures anew
            assert len(client.get_metric_history(run.info.run_id, name)) == 1
        epochs = client.get_metric_history(run.info.run_id, "val_acc")
        assert [m.step for m in epochs] == list(range(1, len(epochs) + 1))


def test_the_parent_gets_the_winners_test_acc_once_best_scored_it(stores, data_dir, tiny_weights):
    make_split(data_dir / "test", per_class=2, seed=7000)
    assert sweep("run", *run_options(data_dir, tiny_weights, 2, 1), stores=stores).exit_code == 0
    client, runs = mlflow_runs(stores)
    assert math.isnan(parent_of(runs).data.metrics["winner/test_acc"])  # not scored yet: no number to trust
    result = sweep("best", *data_args(data_dir, tiny_weights), stores=stores)
    assert result.exit_code == 0, output_of(result)
    _, runs = mlflow_runs(stores)
    winner = next(r for r in runs if r.data.tags.get("sweep.winner") == "true")
    test_acc = winner.data.metrics["best/test_acc"]
    assert parent_of(runs).data.metrics["winner/test_acc"] == test_acc
    assert f"test_acc {test_acc:.3f}" in parent_of(runs).data.tags["mlflow.note.content"]
    # ... and in the terminal's winner line, beside val_acc.
    (winner_line,) = [line for line in result.output.splitlines() if line.startswith("Winner: ")]
    assert f"val_acc {winner.data.metrics['best/val_acc']:.3f}  test_acc {test_acc:.3f}" in winner_line


def test_the_browse_hint_names_the_store_and_the_experiments_runs_page(swept):
    result = sweep("best", stores=swept.stores)
    experiment = MlflowClient(swept.stores["--tracking-uri"]).get_experiment_by_name("clothing").experiment_id
    (hint,) = [line for line in result.output.splitlines() if line.startswith("Browse the runs: ")]
    assert f"--backend-store-uri {swept.stores['--tracking-uri']}" in hint
    assert hint.endswith(f"http://127.0.0.1:5000/#/experiments/{experiment}/runs?workflowType=machine_learning")


def two_tolerances_with_different_winners(swept):
    records = trial_records(swept.stores)
    winners = {t: select_winner(records, t) for t in (0.0, 0.02, 0.1, 0.3)}
    first = next(iter(winners))
    second = next(t for t, w in winners.items() if w.name != winners[first].name)
    return (first, winners[first]), (second, winners[second])


@pytest.mark.slow  # registers twice in processes of its own
def test_registering_keeps_run_timing_describes_the_version_and_moves_the_champion_alias(swept, winner_restored):
    client, _ = mlflow_runs(swept.stores)
    name = "clothing-champion"
    versions = []
    experiment = client.get_experiment_by_name("clothing").experiment_id
    for tolerance, winner in two_tolerances_with_different_winners(swept):
        before = client.get_run(winner.run_id).info
        argv = ["best", "--tolerance", str(tolerance), "--register", name, *data_args(swept.data_dir, swept.weights)]
        # A real process: MLflow's warnings and prints go to the real stderr.
        result = subprocess.run(sweep_argv(*argv, stores=swept.stores), capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"models:/{name}@champion" in result.stdout
        assert "Pickle" not in result.stderr and "Successfully registered" not in result.stderr, result.stderr
        after = client.get_run(winner.run_id).info
        assert (after.start_time, after.end_time, after.status) == (before.start_time, before.end_time, before.status)

        version = client.get_model_version_by_alias(name, "champion")
        versions.append(str(version.version))
        assert version.run_id == winner.run_id
        assert version.tags["checkpoint_model_id"] == winner.model_id  # the trial's logged checkpoint
        assert version.tags["trial"] == winner.name and version.tags["study"] == "clothing"
        assert float(version.tags["val_acc"]) == pytest.approx(winner.val_acc, abs=1e-4)
        assert float(version.tags["gap"]) == pytest.approx(winner.gap, abs=1e-4)
        assert version.tags["stage"] == winner.stage
        assert winner.name in version.description and "smallest gap" in version.description
        # The logged model sits in the study's experiment, beside its run, not under "Default".
        logged = client.search_logged_models([experiment])
        assert winner.run_id in {m.source_run_id for m in logged}
    assert not client.search_logged_models(["0"])
    assert versions == ["1", "2"]

    # In a fresh process, the alias loads the latest winner.
    script = f"""
import mlflow, mlflow.pyfunc
mlflow.set_tracking_uri({swept.stores["--tracking-uri"]!r})
print(mlflow.MlflowClient().get_model_version_by_alias({name!r}, "champion").run_id)
print(type(mlflow.pyfunc.load_model("models:/{name}@champion").unwrap_python_model()).__name__)
"""
    fresh = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    run_id, kind = fresh.stdout.split()[-2:]
    assert run_id == two_tolerances_with_different_winners(swept)[1][1].run_id
    assert kind == "ImageClassifier"


def test_every_trials_checkpoint_is_a_logged_model_with_its_best_epochs_metrics(swept):
    """MLflow 3's Models tab: one READY logged model per trial that has a checkpoint (COMPLETE and
    PRUNED), of type "checkpoint", named after it, with its run's params, its study, stage and number as
    tags, and the best
    epoch's metrics linked to it at that epoch; ranked by val_acc as `sweep trials --sort val_acc` ranks."""
    client = MlflowClient(swept.stores["--tracking-uri"])
    experiment = client.get_experiment_by_name("clothing")
    by_val_acc = [{"field_name": "metrics.val_acc", "ascending": False}]
    checkpoints = "model_type = 'checkpoint'"  # not the champions other tests register in this experiment
    models = client.search_logged_models([experiment.experiment_id], checkpoints, order_by=by_val_acc)
    records = {r.name: r for r in trial_records(swept.stores) if r.state in ("COMPLETE", "PRUNED")}
    assert sorted(m.name for m in models) == sorted(records) and len(models) == swept.trials
    for model in models:
        record = records[model.name]
        run = client.get_run(record.run_id)
        assert model.status.name == "READY" and model.model_id == record.model_id
        assert model.source_run_id == record.run_id and model.params == run.data.params
        assert model.tags["stage"] == "head" and model.tags["sweep.study"] == "clothing"
        assert model.tags["optuna.trial_number"] == str(record.number)
        linked = {m.key: m for m in model.metrics}
        assert {m.step for m in linked.values()} == {record.best_epoch}
        assert linked["val_acc"].value == record.val_acc and linked["train_acc"].value == record.train_acc
        assert linked["gap"].value == pytest.approx(record.gap)
        assert {"val_loss", "train_loss"} <= set(linked)
        # Linked, not logged again: the run's curve keeps one point per epoch.
        steps = [m.step for m in client.get_metric_history(record.run_id, "val_acc")]
        assert sorted(steps) == sorted(set(steps))
    val_accs = [{m.key: m.value for m in model.metrics}["val_acc"] for model in models]
    assert val_accs == sorted(val_accs, reverse=True)
    listed = json.loads(sweep("trials", "--sort", "val_acc", "--format", "json", stores=swept.stores).output)
    assert models[0].model_id == listed[0]["mlflow_model_id"] or val_accs[0] == val_accs[1] == listed[0]["val_acc"]
    assert {row["mlflow_model_id"] for row in listed} == {m.model_id for m in models}


def test_predict_takes_a_trials_logged_model_as_it_takes_the_exported_file(swept, exported, tmp_path):
    winner = next(r for r in trial_records(swept.stores) if r.name == exported.payload["provenance"]["trial"])
    folder = swept.data_dir / "validation"
    rows = {}
    for name, model in (("file", str(exported.path)), ("logged", f"models:/{winner.model_id}")):
        out = tmp_path / f"{name}.csv"
        options = ["--tracking-uri", swept.stores["--tracking-uri"], "--backbone-weights", str(swept.weights)]
        result = CliRunner().invoke(cli, ["predict", model, str(folder), "--output", str(out), *options])
        assert result.exit_code == 0, result.output
        rows[name] = list(csv.DictReader(out.open(encoding="utf-8")))
    assert rows["logged"] == rows["file"] and len(rows["file"]) == len(list(folder.rglob("*.jpg")))
    unknown = CliRunner().invoke(cli, ["predict", "models:/m-nothere", str(folder), *options])
    assert_one_error(unknown, "no logged model 'm-nothere'", "trials --wide")
    other_weights = tmp_path / "other.pth"
    torch.save(load_backbone(None).state_dict(), other_weights)  # a MobileNetV2, not the one it trained on
    other = CliRunner().invoke(
        cli, ["predict", f"models:/{winner.model_id}", str(folder), *options[:2], "--backbone-weights", other_weights]
    )
    assert_one_error(other, "other backbone weights", "--backbone-weights")


def test_a_trial_from_before_logged_models_reads_its_checkpoint_from_its_run(swept, tmp_path):
    """Stores written before checkpoints were logged models keep them as the run's artifact."""
    winner = select_winner(trial_records(swept.stores), 0.02)
    tracker = Tracker(swept.stores["--tracking-uri"])
    head = tracker.fetch_checkpoint(winner)
    older = tmp_path / "checkpoint" / "head.pt"
    older.parent.mkdir()
    torch.save(head, older)
    run = tracker.client.create_run(tracker.client.create_experiment("older"), run_name=winner.name)
    tracker.log_file(run.info.run_id, older, "checkpoint")  # where runs from before logged models kept it
    again = tracker.fetch_checkpoint(replace(winner, run_id=run.info.run_id, model_id=None))
    assert again["provenance"] == head["provenance"] and again["state_dict"].keys() == head["state_dict"].keys()
