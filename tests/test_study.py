"""Crash-safe resume, failing trials and parallel workers, with real stores and real processes."""

import dataclasses
import os
import signal
import subprocess
import time

import optuna
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState
from sweep_helpers import checkpoint_files, load_study, mlflow_runs, output_of, run_options, sweep, sweep_argv

import sweep.objective as objective_module
from bench.servers import mlflow_server as start_mlflow_server
from bench.servers import spawned_workers, wait_for
from sweep.storage import STALE_REASON, TAKEN_OVER_REASON
from sweep.tracking import ParentRun, Tracker

pytestmark = pytest.mark.slow


def worker_env():
    # One-second heartbeats, so a killed trial goes stale in seconds, not the default 20.
    return {**os.environ, "SWEEP_HEARTBEAT_SECONDS": "1", "OMP_NUM_THREADS": "1"}


def children_by_trial(stores, stage="head"):
    """The stage's trial runs by Optuna trial number, the parent runs, and the number of all trial runs."""
    _, runs = mlflow_runs(stores)
    children = [r for r in runs if r.data.tags.get("sweep.role") == "trial"]
    parents = [r for r in runs if r.data.tags.get("sweep.role") == "study"]
    of_stage = {int(r.data.tags["optuna.trial_number"]): r for r in children if r.data.tags["stage"] == stage}
    return of_stage, parents, len(children)


def running_trial_with_epochs(stores, epochs, study="clothing"):
    try:
        study = load_study(stores, study)
    except Exception:  # the store or the study does not exist yet
        return None
    running = study.get_trials(states=(optuna.trial.TrialState.RUNNING,))
    return running[0] if running and len(running[0].intermediate_values) >= epochs else None


def assert_no_repeated_configuration(study):
    configurations = [tuple(sorted(t.params.items())) for t in study.trials[:10]]
    assert len(set(configurations)) == len(configurations), configurations


def test_a_sweep_killed_in_either_stage_resumes_to_its_target_without_repeating_a_configuration(
    stores, data_dir, tiny_weights
):
    """Killed during a stage-1 trial, then during the stage-2 trial: each resume fails the dead trial
    (its heartbeat stopped), closes its run FAILED, runs a replacement and draws no configuration
    again; a finished study never runs stage 2 twice."""
    options = ["--pruner", "none", "--finetune-blocks", "1", "--finetune-epochs", "120", "--finetune-patience", "0"]
    command = sweep_argv("run", *run_options(data_dir, tiny_weights, 3, 150), *options, stores=stores)
    victim = subprocess.Popen(command, env=worker_env())
    killed = wait_for(
        lambda: (t := running_trial_with_epochs(stores, 3)) and t.number == 1 and t, what="trial 1 in progress"
    )
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    runs, _, _ = children_by_trial(stores)
    assert runs[killed.number].info.status == "RUNNING"  # what a crash leaves behind

    resumed = subprocess.Popen(command, env=worker_env())  # finishes stage 1; killed again in stage 2
    wait_for(lambda: running_trial_with_epochs(stores, 2, "clothing.finetune"), what="stage 2 in progress")
    resumed.send_signal(signal.SIGKILL)
    resumed.wait()
    study = load_study(stores)
    assert {t.number: t.state.name for t in study.trials} == {0: "COMPLETE", 1: "FAIL", 2: "COMPLETE", 3: "COMPLETE"}
    # The resumed process seeds each trial from its number: it never draws trial 0's or 1's again.
    assert_no_repeated_configuration(study)
    runs, _, _ = children_by_trial(stores)
    assert runs[killed.number].info.status == "FAILED"
    assert "heartbeat" in runs[killed.number].data.tags["sweep.error"]
    assert all(runs[t.number].info.status == "FINISHED" for t in study.trials if t.state.name == "COMPLETE")

    finished = subprocess.run(command, env=worker_env(), capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr
    assert "finetune-001" in finished.stdout
    finetune = load_study(stores, "clothing.finetune")
    assert [t.state.name for t in finetune.trials] == ["FAIL", "COMPLETE"]
    assert finetune.trials[0].params == finetune.trials[1].params  # the same recipe, run once more
    runs, parents, n_children = children_by_trial(stores, stage="finetune")
    assert {n: r.info.status for n, r in runs.items()} == {0: "FAILED", 1: "FINISHED"}
    assert [r.info.run_name for _, r in sorted(runs.items())] == ["finetune-000", "finetune-001"]
    _, all_runs = mlflow_runs(stores)
    assert "RUNNING" not in {r.info.status for r in all_runs}
    assert n_children == len(study.trials) + 2  # exactly one run per trial of both stages, none duplicated
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"

    # A finished study never runs stage 2 twice.
    again = sweep("run", *run_options(data_dir, tiny_weights, 3, 150), *options, stores=stores)
    assert again.exit_code == 0, output_of(again)
    assert len(load_study(stores, "clothing.finetune").trials) == 2


def test_the_same_seed_draws_the_same_configurations_in_an_uninterrupted_run(stores, data_dir, tiny_weights, tmp_path):
    other = {**stores, "--storage": f"sqlite:///{tmp_path / 'again.db'}"}  # a new study, the same cache
    other["--tracking-uri"] = f"sqlite:///{tmp_path / 'again-mlflow.db'}"
    sequences = []
    for store in (stores, other):
        result = sweep("run", *run_options(data_dir, tiny_weights, 4, 1), "--pruner", "none", stores=store)
        assert result.exit_code == 0, output_of(result)
        sequences.append([t.params for t in load_study(store).trials])
    assert sequences[0] == sequences[1] and len(sequences[0]) == 4
    assert_no_repeated_configuration(load_study(stores))


def rig_trials(monkeypatch, plan):
    """Make chosen trials diverge or raise, through the real search space and training code."""
    real_suggest = objective_module.HeadTrial.suggest

    def rigged(self, trial):
        config = real_suggest(self, trial)
        change = plan(trial.number)
        return dataclasses.replace(config, **change) if change else config

    monkeypatch.setattr(objective_module.HeadTrial, "suggest", rigged)


def test_diverging_and_raising_trials_are_recorded_and_the_sweep_goes_on(stores, data_dir, tiny_weights, monkeypatch):
    # Trial 1 gets an infinite learning rate (NaN loss); trial 2 an impossible layer size (raises).
    rig_trials(monkeypatch, lambda n: {1: {"lr": float("inf")}, 2: {"size_inner": -1}}.get(n))
    result = sweep("run", *run_options(data_dir, tiny_weights, 3, 2), stores=stores)
    assert result.exit_code == 0, result.output
    study = load_study(stores)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "PRUNED", "FAIL", "COMPLETE"]
    runs, _, _ = children_by_trial(stores)
    assert runs[1].info.status == "KILLED" and runs[1].data.tags["sweep.stop_reason"].startswith("diverged")
    assert runs[2].info.status == "FAILED" and "RuntimeError" in runs[2].data.tags["sweep.error"]
    assert runs[3].info.status == "FINISHED"


def test_a_run_whose_every_trial_fails_exits_non_zero_with_the_first_error(stores, data_dir, tiny_weights, monkeypatch):
    rig_trials(monkeypatch, lambda n: {"size_inner": -1})
    result = sweep("run", *run_options(data_dir, tiny_weights, 2, 1), stores=stores)
    assert result.exit_code == 1
    assert "Error: every trial of this run failed; first error: trial-000: RuntimeError" in result.output
    assert [t.state.name for t in load_study(stores).trials] == ["FAIL", "FAIL"]


def test_a_trial_that_fails_before_its_run_exists_still_says_why(stores, data_dir, tiny_weights, monkeypatch):
    """A failure before the trial's run is created (here in its suggest; in a cluster, a store that
    refuses the write) still leaves the trial's reason in Optuna, and no run to leave RUNNING."""
    real_suggest = objective_module.HeadTrial.suggest

    def suggest(self, trial):
        if trial.number == 1:
            raise RuntimeError("no configuration drawn")
        return real_suggest(self, trial)

    monkeypatch.setattr(objective_module.HeadTrial, "suggest", suggest)
    result = sweep("run", *run_options(data_dir, tiny_weights, 3, 1), "--pruner", "none", stores=stores)
    assert result.exit_code == 0, result.output
    trials = load_study(stores).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    assert trials[1].user_attrs["error"] == "RuntimeError: no configuration drawn"
    runs, _, _ = children_by_trial(stores)
    assert sorted(runs) == [0, 2, 3]


def fail_as_another_worker_would(stores, number, study="clothing"):
    """What another worker's stale check does to a trial whose heartbeat it has not seen in time: FAIL,
    through that worker's own connection to the study."""
    other = optuna.storages.RDBStorage(stores["--storage"])
    trial_id = other.get_trial_id_from_study_id_trial_number(other.get_study_id_from_name(study), number)
    other.set_trial_state_values(trial_id, TrialState.FAIL)


@pytest.mark.parametrize("when", ["before its run exists", "during an epoch"])
def test_a_live_trial_another_worker_failed_is_stopped_closed_and_replaced(
    stores, data_dir, tiny_weights, monkeypatch, when
):
    """A worker whose heartbeat did not reach the database in time (an outage, an overloaded machine)
    finds its trial failed by another: it stops it, closes the trial's run as FAILED with the reason
    (the other worker may not have known the run), and runs a replacement. No traceback."""
    if when == "before its run exists":
        rig_trials(monkeypatch, lambda n: fail_as_another_worker_would(stores, 1) if n == 1 else None)
    else:
        real_train, calls = objective_module.HeadTrial.train, []

        def train(self, config, on_epoch):
            calls.append(1)
            if len(calls) != 2:  # trial 1 only
                return real_train(self, config, on_epoch)

            def first_epoch_then_failed(epoch, metrics, model):
                fail_as_another_worker_would(stores, 1)
                on_epoch(epoch, metrics, model)

            return real_train(self, config, first_epoch_then_failed)

        monkeypatch.setattr(objective_module.HeadTrial, "train", train)
    result = sweep("run", *run_options(data_dir, tiny_weights, 3, 2), "--pruner", "none", stores=stores)
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    assert f"1 trial(s) failed; first error: trial-001: {TAKEN_OVER_REASON}" in result.output, result.output
    assert [t.state.name for t in load_study(stores).trials] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    runs, _, _ = children_by_trial(stores)
    assert runs[1].info.status == "FAILED" and runs[1].data.tags["sweep.error"] == TAKEN_OVER_REASON
    assert [runs[n].info.status for n in (0, 2, 3)] == ["FINISHED"] * 3


def test_a_failed_trials_run_left_running_is_closed_by_the_next_sweep(stores, data_dir, tiny_weights):
    """A worker that failed a stale trial and died before closing its run leaves a RUNNING run whose
    trial is FAIL, which no stale check sees again; the next sweep to finish closes it, with the reason."""
    assert sweep("run", *run_options(data_dir, tiny_weights, 1, 1), stores=stores).exit_code == 0
    study = load_study(stores)
    dead = study.ask()  # a worker's trial and its run, then the failer's half of the stale check
    tracker = Tracker(stores["--tracking-uri"])
    experiment_id = tracker.experiment_id("clothing")
    parent = ParentRun(experiment_id, tracker.find_parent(experiment_id), "clothing")
    in_its_run = tracker.trial_run(parent, "trial-001", dead.number, "head", {})  # its worker died in it
    orphan = in_its_run.__enter__()
    fail_as_another_worker_would(stores, dead.number)
    assert tracker.client.get_run(orphan).info.status == "RUNNING"
    result = sweep("run", *run_options(data_dir, tiny_weights, 2, 1), stores=stores)
    assert result.exit_code == 0, result.output
    run = tracker.client.get_run(orphan)
    assert run.info.status == "FAILED" and run.data.tags["sweep.error"] == STALE_REASON
    _, runs = mlflow_runs(stores)
    assert "RUNNING" not in {r.info.status for r in runs}


def test_a_jobs_worker_that_stops_on_an_error_says_why_in_one_line_and_the_main_process_finishes(
    stores, data_dir, tiny_weights, tmp_path
):
    """A `--jobs` worker whose backbone file vanished after the main process loaded it: the worker's
    error reaches the terminal as one `Error:` line from the main process (no multiprocessing
    traceback), and the main process still runs the study to its target."""
    weights = tmp_path / "weights.pth"
    weights.write_bytes(tiny_weights.read_bytes())
    command = sweep_argv("run", *run_options(data_dir, weights, 4, 2), "--pruner", "none", "--jobs", "2", stores=stores)
    main = subprocess.Popen(command, env=worker_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    # The main process has loaded the backbone before it spawns its workers; they load it seconds
    # later, after their imports.
    wait_for(lambda: spawned_workers(main.pid), what="the main process spawning its workers")
    weights.unlink()
    _, stderr = main.communicate(timeout=600)
    assert main.returncode == 0, stderr
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("Error:")]
    assert errors == [f"Error: --jobs worker 1 stopped: BackboneError: backbone weights file {weights} does not exist; "
                      "pass a MobileNetV2 state_dict (CLOTHING_BACKBONE_WEIGHTS) or IMAGENET1K_V1 to download "
                      "torchvision's"], stderr  # fmt: skip
    assert sorted(t.state.name for t in load_study(stores).trials) == ["COMPLETE"] * 4


@pytest.fixture
def mlflow_server(tmp_path):
    with start_mlflow_server(tmp_path / "server", f"sqlite:///{tmp_path / 'server.db'}") as server:
        yield server.uri


def test_jobs_two_on_a_tracking_server_finish_exactly_the_target_and_the_main_process_closes_the_parent(
    stores, data_dir, tiny_weights, mlflow_server
):
    """`--jobs 2`: two processes, one study, exactly its target, no configuration twice, every
    checkpoint over HTTP; the workers only run trials, so the parent run stays RUNNING until the main
    process has run stage 2 and published."""
    stores = {**stores, "--tracking-uri": mlflow_server}
    options = ["--pruner", "none", "--jobs", "2", "--finetune-blocks", "1", "--finetune-epochs", "40"]
    command = sweep_argv("run", *run_options(data_dir, tiny_weights, 6, 10), *options, stores=stores)
    env = {**worker_env(), "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2"}
    main = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    closed_early = []
    while main.poll() is None:
        try:
            _, runs = mlflow_runs(stores)
        except Exception:  # the stores are still being created
            runs = []
        parent = [r.info.status for r in runs if r.data.tags.get("sweep.role") == "study"]
        trials = [r for r in runs if r.data.tags.get("sweep.role") == "trial"]
        work_left = any(r.info.status == "RUNNING" for r in trials) or not any(
            r.data.tags["stage"] == "finetune" for r in trials
        )
        if parent and parent[0] != "RUNNING" and work_left:
            closed_early.append((parent[0], [(r.info.run_name, r.info.status) for r in trials]))
        time.sleep(0.2)
    assert main.returncode == 0, main.stderr.read()
    assert closed_early == []
    study = load_study(stores)
    finished = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) == 6 and len({t.number for t in study.trials}) == len(study.trials)
    assert_no_repeated_configuration(study)
    runs, parents, n_children = children_by_trial(stores)
    assert [p.info.status for p in parents] == ["FINISHED"]
    assert n_children == len(study.trials) + 1 == len(runs) + 1  # one run per trial, and stage 2's
    assert {r.data.tags["mlflow.parentRunId"] for r in runs.values()} == {parents[0].info.run_id}
    assert {r.data.tags["optuna.trial_number"] for r in runs.values()} == {str(t.number) for t in study.trials}
    client = MlflowClient(mlflow_server)
    for run in runs.values():
        assert checkpoint_files(client, run) == ["head.pt"]
