import optuna
import pytest
import torch
from click.testing import CliRunner
from sweep_helpers import invoke, load_study, mlflow_runs, run_sweep_cli

from clothing.checkpoint import load_model
from clothing.model import load_backbone
from sweep.cli import cli
from sweep.export import build_model, fetch_head
from sweep.study import trial_records
from sweep.tracking import Tracker

METRICS = ("train_loss", "train_acc", "val_loss", "val_acc")


def best_cli(stores, *extra):
    return invoke(stores, "best", *extra)


@pytest.fixture
def swept(stores, data_dir, tiny_weights):
    result = run_sweep_cli(stores, data_dir, tiny_weights, trials=3, epochs=2)
    assert result.exit_code == 0, result.output
    return result


def test_a_sweep_logs_one_parent_and_a_nested_run_per_trial(swept, stores):
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
        assert child.info.status == "FINISHED" and child.data.tags["optuna.state"] == "COMPLETE"
        assert {"lr", "size_inner", "epochs", "batch_size", "seed", "image_size", "backbone"} <= set(child.data.params)
        for metric in METRICS:
            assert [m.step for m in client.get_metric_history(child.info.run_id, metric)] == [1, 2]
        assert {"best_epoch", "best_val_acc", "best_train_acc", "gap"} <= set(child.data.metrics)
        assert [a.path for a in client.list_artifacts(child.info.run_id, "checkpoint")] == ["checkpoint/head.pt"]
        number = int(child.data.tags["optuna.trial_number"])
        assert study.trials[number].user_attrs["mlflow_run_id"] == child.info.run_id
    assert "trials.csv" in [a.path for a in client.list_artifacts(parent.info.run_id)]
    assert "mlflow ui --backend-store-uri" in swept.output


def test_rerunning_with_a_higher_target_adds_only_the_missing_trials(swept, stores, data_dir, tiny_weights):
    again = run_sweep_cli(stores, data_dir, tiny_weights, trials=3, epochs=2)
    assert again.exit_code == 0 and len(load_study(stores).trials) == 3  # nothing to do
    more = run_sweep_cli(stores, data_dir, tiny_weights, trials=5, epochs=2)
    assert more.exit_code == 0, more.output
    assert len(load_study(stores).trials) == 5
    _, runs = mlflow_runs(stores)
    parents = [r for r in runs if r.data.tags.get("sweep.role") == "study"]
    children = [r for r in runs if r.data.tags.get("sweep.role") == "trial"]
    assert len(parents) == 1 and len(children) == 5
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert sorted(c.info.run_name for c in children)[-2:] == ["trial-003", "trial-004"]


def test_best_names_the_winner_tags_it_and_exports_an_equivalent_model(swept, stores, data_dir, tiny_weights, tmp_path):
    out = tmp_path / "model.pt"
    result = best_cli(
        stores, "--export", str(out), "--backbone-weights", str(tiny_weights), "--data-dir", str(data_dir)
    )
    assert result.exit_code == 0, result.output
    assert "Rule: among COMPLETE trials" in result.output and "Winner: trial" in result.output
    winner_name = result.output.split("Winner: ")[1].split()[0]

    payload = torch.load(out, weights_only=True)
    assert payload["trial"] == winner_name and payload["classes"] == ["hat", "pants", "shoes"]
    assert {
        "format_version",
        "state_dict",
        "size_inner",
        "num_classes",
        "image_size",
        "mean",
        "std",
        "metrics",
        "study",
        "mlflow_run_id",
    } <= set(payload)

    exported, _ = load_model(out)
    record = next(r for r in trial_records(load_study(stores)) if r.name == winner_name)
    in_memory = build_model(fetch_head(Tracker(stores["--tracking-uri"]), record), load_backbone(tiny_weights))
    x = torch.randn(3, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(exported(x), in_memory(x))

    client, runs = mlflow_runs(stores)
    parent = next(r for r in runs if r.data.tags.get("sweep.role") == "study")
    assert parent.data.tags["sweep.winner_trial"] == winner_name
    assert client.get_run(record.run_id).data.tags["sweep.winner"] == "true"


def test_best_scores_the_winner_on_a_test_split(swept, stores, data_dir, tiny_weights):
    from images import make_split

    make_split(data_dir / "test", per_class=2, seed=5000)
    result = best_cli(stores, "--backbone-weights", str(tiny_weights), "--data-dir", str(data_dir))
    assert result.exit_code == 0, result.output
    assert "test_acc" in result.output
    client, runs = mlflow_runs(stores)
    winner = [r for r in runs if r.data.tags.get("sweep.winner") == "true"]
    assert len(winner) == 1 and 0.0 <= winner[0].data.metrics["test_acc"] <= 1.0


def test_predict_prints_k_classes_per_image(swept, stores, data_dir, tiny_weights, tmp_path):
    out = tmp_path / "model.pt"
    assert best_cli(stores, "--export", str(out), "--backbone-weights", str(tiny_weights)).exit_code == 0
    images = [str(data_dir / "validation" / "hat" / "00.jpg"), str(data_dir / "validation" / "shoes" / "01.jpg")]
    result = CliRunner().invoke(cli, ["predict", str(out), *images, "--top-k", "2"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert [lines[0], lines[3]] == images and len(lines) == 6
    assert all(line.split()[1] in ("hat", "pants", "shoes") for line in lines[1:3] + lines[4:6])


def test_best_on_a_missing_study_or_one_without_complete_trials_is_an_error(stores):
    missing = best_cli(stores, "--study", "nope")
    assert missing.exit_code == 1 and missing.output.startswith("Error: no study named 'nope'")
    study = optuna.create_study(study_name="empty", storage=stores["--storage"])
    study.tell(study.ask(), state=optuna.trial.TrialState.FAIL)
    empty = best_cli(stores, "--study", "empty")
    assert empty.exit_code == 1 and "no COMPLETE trial" in empty.output


def test_opt_in_dimensions_are_searched_and_recorded(stores, data_dir, tiny_weights):
    result = run_sweep_cli(stores, data_dir, tiny_weights, 2, 1, "--search", "dropout", "--search", "label_smoothing")
    assert result.exit_code == 0, result.output
    study = load_study(stores)
    assert all({"lr", "size_inner", "dropout", "label_smoothing"} == set(t.params) for t in study.trials)
    _, runs = mlflow_runs(stores)
    for child in (r for r in runs if r.data.tags.get("sweep.role") == "trial"):
        trial = study.trials[int(child.data.tags["optuna.trial_number"])]
        assert float(child.data.params["dropout"]) == trial.params["dropout"]
        assert float(child.data.params["label_smoothing"]) == trial.params["label_smoothing"]
        assert float(child.data.params["weight_decay"]) == 0.0  # not searched: stays off


def test_best_reports_tta_separately(swept, stores, data_dir, tiny_weights):
    result = best_cli(stores, "--tta", "--backbone-weights", str(tiny_weights), "--data-dir", str(data_dir))
    assert result.exit_code == 0, result.output
    assert "without TTA" in result.output and "with TTA (image + mirror)" in result.output
    _, runs = mlflow_runs(stores)
    winner = next(r for r in runs if r.data.tags.get("sweep.winner") == "true")
    assert 0.0 <= winner.data.metrics["val_acc_tta"] <= 1.0


def test_the_rule_reads_the_eval_mode_train_acc_that_each_trial_logs(stores, data_dir, tiny_weights):
    result = run_sweep_cli(stores, data_dir, tiny_weights, 2, 2, "--search", "dropout", "--views", "2")
    assert result.exit_code == 0, result.output
    client, runs = mlflow_runs(stores)
    by_id = {r.info.run_id: r for r in runs}
    for record in trial_records(load_study(stores)):
        history = {m.step: m.value for m in client.get_metric_history(record.run_id, "train_acc")}
        assert record.train_acc == pytest.approx(history[record.best_epoch])
        assert by_id[record.run_id].data.metrics["gap"] == pytest.approx(record.gap)
        running = client.get_metric_history(record.run_id, "running_train_acc")
        assert [m.step for m in running] == sorted(history)  # the train-mode accuracy, kept under its own name


def test_the_study_says_what_it_is_for_optuna_dashboard(swept, stores):
    study = load_study(stores)
    assert study.metric_names == ["val_acc"]
    attrs = study.user_attrs
    assert attrs["tolerance"] == 0.02 and "smallest gap" in attrs["rule"]
    assert set(attrs["search_space"]["stage1"]["searched"]) >= {"lr", "size_inner"}
    assert "head" in attrs["stages"]
