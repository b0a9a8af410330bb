import json
import re

import pytest
from sweep_helpers import checkpoint_files, load_study, mlflow_runs, plain_file, run_options, sweep, trial_records

METRICS = ("train_loss", "train_acc", "val_loss", "val_acc")


def test_a_sweep_logs_one_parent_and_a_nested_run_per_trial(three_trials, stores):
    client, runs = mlflow_runs(stores)
    parents = [r for r in runs if r.data.tags.get("sweep.role") == "study"]
    children = [r for r in runs if r.data.tags.get("sweep.role") == "trial"]
    assert len(parents) == 1 and len(children) == 3
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert sorted(r.info.run_name for r in children) == ["trial-000", "trial-001", "trial-002"]
    study = load_study(stores)
    for child in children:
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.info.status == "FINISHED" and child.data.tags["sweep.state"] == "COMPLETE"
        assert {"lr", "size_inner", "epochs", "batch_size", "seed", "image_size", "backbone"} <= set(child.data.params)
        for metric in METRICS:
            assert [m.step for m in client.get_metric_history(child.info.run_id, metric)] == [1, 2]
        assert {"best/epoch", "best/val_acc", "best/train_acc", "best/gap"} <= set(child.data.metrics)
        assert checkpoint_files(client, child) == ["head.pt"]
        number = int(child.data.tags["optuna.trial_number"])
        assert study.trials[number].user_attrs["mlflow_run_id"] == child.info.run_id
    assert "trials.csv" in [a.path for a in client.list_artifacts(parent.info.run_id)]
    assert "mlflow ui --backend-store-uri" in three_trials.output


def test_rerunning_with_a_higher_target_adds_only_the_missing_trials(three_trials, stores, data_dir, tiny_weights):
    again = sweep("run", *run_options(data_dir, tiny_weights, 3, 2), stores=stores)
    assert again.exit_code == 0 and len(load_study(stores).trials) == 3  # nothing to do
    more = sweep("run", *run_options(data_dir, tiny_weights, 5, 2), stores=stores)
    assert more.exit_code == 0, more.output
    assert len(load_study(stores).trials) == 5
    _, runs = mlflow_runs(stores)
    parents = [r for r in runs if r.data.tags.get("sweep.role") == "study"]
    children = [r for r in runs if r.data.tags.get("sweep.role") == "trial"]
    assert len(parents) == 1 and len(children) == 5
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert sorted(c.info.run_name for c in children)[-2:] == ["trial-003", "trial-004"]


def test_opt_in_dimensions_are_searched_and_recorded(stores, data_dir, tiny_weights, tmp_path):
    with_progress = [a for a in run_options(data_dir, tiny_weights, 2, 1) if a != "--quiet"]
    dims = {"dropout": {"type": "categorical", "choices": [0.0, 0.2, 0.5]}}
    dims["label_smoothing"] = {"type": "categorical", "choices": [0.0, 0.1, 0.2]}
    searched = plain_file(tmp_path, space=dims)
    result = sweep("run", *with_progress, *searched, stores=stores)
    assert result.exit_code == 0, result.output
    study = load_study(stores)
    assert all({"lr", "size_inner", "dropout", "label_smoothing"} == set(t.params) for t in study.trials)
    # Every searched dimension in the terminal: each trial's line, the trials table, CSV and JSON.
    for trial in study.trials:
        # (the first line may follow the progress bar's last frame on the same line here)
        (line,) = re.findall(rf"trial-{trial.number:03d}  lr .*", result.output)
        for name in ("dropout", "label_smoothing"):
            assert f"  {name} {trial.params[name]}  " in line, line
    table = sweep("trials", stores=stores).output.splitlines()
    assert {"dropout", "label_smoothing"} <= set(table[0].split())
    rows = json.loads(sweep("trials", "--format", "json", stores=stores).output)
    assert [(r["dropout"], r["label_smoothing"]) for r in rows] == [
        (t.params["dropout"], t.params["label_smoothing"]) for t in study.trials
    ]
    assert "dropout" in sweep("trials", "--format", "csv", stores=stores).output.splitlines()[0].split(",")
    _, runs = mlflow_runs(stores)
    for child in (r for r in runs if r.data.tags.get("sweep.role") == "trial"):
        trial = study.trials[int(child.data.tags["optuna.trial_number"])]
        assert float(child.data.params["dropout"]) == trial.params["dropout"]
        assert float(child.data.params["label_smoothing"]) == trial.params["label_smoothing"]
        assert float(child.data.params["weight_decay"]) == 0.0  # not searched: stays off


def test_the_rule_reads_the_eval_mode_train_acc_that_each_trial_logs(stores, data_dir, tiny_weights, tmp_path):
    with_dropout = plain_file(tmp_path, space={"dropout": {"type": "categorical", "choices": [0.0, 0.2, 0.5]}})
    result = sweep("run", *run_options(data_dir, tiny_weights, 2, 2), *with_dropout, "--views", "2", stores=stores)
    assert result.exit_code == 0, result.output
    client, runs = mlflow_runs(stores)
    by_id = {r.info.run_id: r for r in runs}
    for record in trial_records(stores):
        history = {m.step: m.value for m in client.get_metric_history(record.run_id, "train_acc")}
        assert record.train_acc == pytest.approx(history[record.best_epoch])
        assert by_id[record.run_id].data.metrics["best/gap"] == pytest.approx(record.gap)
        running = client.get_metric_history(record.run_id, "running_train_acc")
        assert [m.step for m in running] == sorted(history)  # the train-mode accuracy, kept under its own name


def test_the_study_says_what_it_is_for_optuna_dashboard(three_trials, stores):
    study = load_study(stores)
    assert study.metric_names == ["val_acc"]
    attrs = study.user_attrs
    assert attrs["tolerance"] == 0.02 and "smallest gap" in attrs["rule"]
    assert set(attrs["search_space"]["stage1"]["searched"]) >= {"lr", "size_inner"}
    assert "head" in attrs["stages"]
