"""`run --refit`: the winner's configuration trained again on train + validation, recorded as such and
exported by `best`, while the record keeps the chosen trial's scores."""

from pathlib import Path

import torch
from mlflow import MlflowClient
from sweep_helpers import mlflow_runs, output_of, run_options, sweep

from clothing.checkpoint import load_model, spec_of
from clothing.data import ClothingDataset
from sweep.config import SweepConfig
from sweep.ranking import rank
from sweep.refit import run_refit
from sweep.session import prepare
from sweep.study import read_studies
from sweep.tracking import REFIT_OF_TAG, Tracker


def refit_runs(stores):
    _, runs = mlflow_runs(stores)
    return [r for r in runs if r.data.tags.get("sweep.role") == "refit"]


def test_refit_trains_the_winner_on_both_splits_and_best_exports_it(stores, data_dir, tiny_weights, tmp_path):
    talking = [o for o in run_options(data_dir, tiny_weights, 3, 2) if o != "--quiet"]  # its lines on show
    options = (*talking, "--views", "2", "--no-system-metrics", "--refit")
    result = sweep("run", *options, stores=stores)
    assert result.exit_code == 0, output_of(result)
    studies = read_studies(stores["--storage"], "clothing")
    assert len(studies.stage1.trials) == 3  # the refit is no Optuna trial
    winner = rank(studies).winner
    n_train, n_val = (len(ClothingDataset(data_dir / split)) for split in ("train", "validation"))

    # Its own run, under the parent, named after the trial it refits, saying what it trained on.
    (run,) = refit_runs(stores)
    assert run.info.run_name == f"{winner.name}-refit" and run.info.status == "FINISHED"
    assert run.data.tags[REFIT_OF_TAG] == winner.run_id
    assert run.data.params["trained_on"] == "train + validation" and run.data.params["refit_of"] == winner.name
    assert run.data.params["train_images"] == str(n_train + n_val)  # every labelled image
    assert run.data.params["epochs"] == str(winner.best_epoch)  # the chosen trial's best epoch count
    client = MlflowClient(stores["--tracking-uri"])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_acc")] == list(
        range(1, winner.best_epoch + 1)
    )
    assert "val_acc" not in run.data.metrics  # it trained on validation: no val_acc of its own
    assert f"refit: {winner.name}'s configuration on train + validation ({n_train} + {n_val} images)" in result.output

    # The record is the chosen trial's, unchanged.
    assert rank(read_studies(stores["--storage"], "clothing")).winner == winner

    # `best --export` ships the refit, with the chosen trial's scores; --no-refit ships the trial.
    weights = ("--backbone-weights", tiny_weights, "--data-dir", data_dir)
    best = sweep("best", "--export", tmp_path / "refit.pt", *weights, stores=stores)
    assert best.exit_code == 0, output_of(best)
    assert f"Exported {winner.name}'s refit on train + validation (run {winner.name}-refit)" in best.output
    _, refit_payload = load_model(tmp_path / "refit.pt")
    assert refit_payload["provenance"]["refit_of"] == winner.name
    assert refit_payload["provenance"]["trained_on"] == "train + validation"
    assert refit_payload["metrics"]["val_acc"] == winner.val_acc
    plain = sweep("best", "--no-refit", "--export", tmp_path / "trial.pt", *weights, stores=stores)
    assert plain.exit_code == 0, output_of(plain)
    _, trial_payload = load_model(tmp_path / "trial.pt")
    assert "refit_of" not in trial_payload["provenance"]
    refit_weights, trial_weights = refit_payload["state_dict"], trial_payload["state_dict"]
    assert any(not torch.equal(refit_weights[k], trial_weights[k]) for k in trial_weights if k.startswith("head."))

    # A re-run does not refit again.
    again = sweep("run", *options, stores=stores)
    assert again.exit_code == 0, output_of(again)
    assert f"refit: {winner.name} was already refit" in again.output
    assert len(refit_runs(stores)) == 1


def test_a_stage2_refit_trains_its_blocks_on_both_splits_from_the_same_stage1_head(stores, data_dir, tiny_weights):
    options = (*run_options(data_dir, tiny_weights, 2, 1), "--views", "2", "--finetune-blocks", "1")
    result = sweep("run", *options, "--finetune-epochs", "2", stores=stores)
    assert result.exit_code == 0, output_of(result)
    cfg = SweepConfig(
        data_dir=data_dir,
        backbone_weights=str(tiny_weights),
        storage=stores["--storage"],
        tracking_uri=stores["--tracking-uri"],
        cache_dir=Path(stores["--cache-dir"]),
        views=2,
        finetune_blocks=1,
        refit=True,
        quiet=True,
    )
    session = prepare(cfg, lambda _: None)
    try:
        data = session.data
        # What a refit trains on: both splits' activations at the cut, every view of each image.
        joined = data.train.joined(data.val)
        assert joined.activations().shape[:2] == (len(data.train.labels) + len(data.val.labels), 2)
        torch.testing.assert_close(joined.activations(), torch.cat([data.train.activations(), data.val.activations()]))
        (tuned,) = [r for r in rank(session.studies).records if r.stage == "finetune"]
        run_id = run_refit(session, tuned)  # whatever the rule chose: this test refits the stage-2 trial
    finally:
        session.tracker.close_parent(session.parent.run_id)

    run = MlflowClient(stores["--tracking-uri"]).get_run(run_id)
    assert run.info.run_name == "finetune-000-refit" and run.data.tags["stage"] == "finetune"
    assert run.data.params["source_trial"] == str(tuned.source_trial) and run.data.params["finetune_blocks"] == "1"
    assert run.data.params["train_images"] == str(len(joined.labels))
    tracker = Tracker(stores["--tracking-uri"])
    refit, trial = tracker.run_checkpoint(run_id), tracker.fetch_checkpoint(tuned)
    assert spec_of(refit).finetune_blocks == 1 and refit["provenance"]["refit_of"] == "finetune-000"
    assert refit["train_config"]["epochs"] == tuned.best_epoch
    # Its blocks trained (from the pretrained ones, as the trial's did), to other weights than the trial's.
    blocks = [k for k in trial["state_dict"] if k.startswith("blocks.") and "running" not in k]
    assert any(not torch.equal(refit["state_dict"][k], trial["state_dict"][k]) for k in blocks)
