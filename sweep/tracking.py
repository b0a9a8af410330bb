"""MLflow tracking: with `sweep.registry` and `sweep.serving` beside it, the only modules that import mlflow.

Layout: one experiment per study; one parent run per study, found again by tag so a resumed or
parallel study never gets a second parent; one nested child run per trial named trial-NNN. It uses
MlflowClient with explicit run ids, not the fluent API's global active run, so several trials or
processes can log side by side.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from clothing.checkpoint import HEAD, CheckpointError, load_checkpoint
from clothing.data import shown
from sweep.config import default_tracking_uri
from sweep.select import TrialRecord, rule_text
from sweep.stores import mask_url, not_utf8
from sweep.summary import TRAINED_ON

ROLE_TAG = "sweep.role"
STUDY_TAG = "sweep.study"
STAGE_TAG = "stage"  # head (stage 1, a sweep trial) or finetune (stage 2)
WINNER_TAG = "sweep.winner"  # on the winner's run only
STATE_TAG = "sweep.state"  # a trial run's Optuna state: RUNNING, then COMPLETE, PRUNED or FAIL
NOTE_TAG = "mlflow.note.content"  # the markdown description MLflow's UI shows for a run or an experiment
# MLflow 3's UI shows an experiment of this kind as model training, not GenAI (unless the UI's own
# GenAI/model-training switch overrides it: see browse_hint).
KIND_TAG, TRAINING_KIND = "mlflow.experimentKind", "custom_model_development"
PARENT_ROLE, TRIAL_ROLE, REFIT_ROLE = "study", "trial", "refit"
REFIT_OF_TAG = "sweep.refit_of"  # on a refit's run: the run id of the trial it refits
# Optuna's final state -> the MLflow run status that says the same thing.
CHECKPOINT_ARTIFACT = "checkpoint/head.pt"  # a trial run's checkpoint, as `fetch_checkpoint` reads it
RUN_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}


@dataclass(frozen=True)
class ParentRun:
    """The study's parent run, with its experiment: where every trial's run nests."""

    experiment_id: str
    run_id: str
    study: str


class TrackingError(RuntimeError):
    """The tracking store cannot be used; the message names it and what to do."""


@contextmanager
def _fail_fast_http():
    """Make a reachability check fail in seconds, not after MLflow's minutes of retries."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "5"
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _metrics(metrics: dict[str, float], step: int | None) -> list[Metric]:
    now = int(time.time() * 1000)
    return [Metric(key, float(value), now, step or 0) for key, value in metrics.items()]


class Tracker:
    """A study's view of one MLflow tracking store."""

    def __init__(self, tracking_uri: str) -> None:
        self.tracking_uri = tracking_uri
        if not_utf8(tracking_uri):
            raise TrackingError(
                f"the MLflow tracking store {shown(tracking_uri)} is not valid UTF-8; put it in a folder whose name is"
            )
        if tracking_uri.startswith("sqlite:///"):
            # The default store: keep the database's folder (and so the artifacts beside it) ready.
            Path(tracking_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=tracking_uri)
        remote = urlparse(tracking_uri).scheme in ("http", "https")
        self._sender = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlflow-epochs") if remote else None
        self._pending: dict[str, list[Future]] = {}  # run id -> epochs still being sent (log_epoch)

    def check_reachable(self) -> None:
        """Fail now, before any work, when the store cannot be reached or refuses our credentials."""
        try:
            with _fail_fast_http():
                self.client.search_experiments(max_results=1)
        except MlflowException as exc:
            status = exc.get_http_status_code()
            if status in (401, 403):
                raise TrackingError(
                    f"the MLflow tracking server {mask_url(self.tracking_uri)} refused the credentials "
                    f"(HTTP {status}); set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to a user "
                    "of that server"
                ) from exc
            raise self._unreachable(exc) from exc
        except Exception as exc:  # connection errors come in many types; all mean the same here
            raise self._unreachable(exc) from exc

    def _unreachable(self, exc: Exception) -> TrackingError:
        return TrackingError(
            f"cannot reach the MLflow tracking store {mask_url(self.tracking_uri)} ({type(exc).__name__}); "
            "start the server or pass a reachable --tracking-uri (or $MLFLOW_TRACKING_URI)"
        )

    def _artifact_location(self) -> str | None:
        # With a local SQLite store, keep artifacts in a folder beside the database, so all run
        # state lives in one folder; a server decides for itself.
        if self.tracking_uri.startswith("sqlite:///"):
            db = Path(self.tracking_uri.removeprefix("sqlite:///"))
            return (db.parent / "artifacts").resolve().as_uri()
        return None

    def experiment_id(self, study: str, create: bool = True) -> str | None:
        experiment = self.client.get_experiment_by_name(study)
        if experiment is not None:
            return experiment.experiment_id
        if not create:
            return None
        try:
            return self.client.create_experiment(study, artifact_location=self._artifact_location())
        except MlflowException:
            # Another worker created it between our lookup and create.
            return self.client.get_experiment_by_name(study).experiment_id

    def describe_experiment(self, experiment_id: str, description: str) -> None:
        """Open the experiment on the training-runs view, with a description (set again on every run,
        so an experiment from an older version of the tool gets them too)."""
        self.client.set_experiment_tag(experiment_id, KIND_TAG, TRAINING_KIND)
        self.client.set_experiment_tag(experiment_id, NOTE_TAG, description)

    def find_parent(self, experiment_id: str) -> str | None:
        runs = self.client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{ROLE_TAG}` = '{PARENT_ROLE}'",
            order_by=["attributes.start_time ASC"],
        )
        # The oldest parent is the study's; ties (same millisecond) are broken by run id.
        runs = sorted(runs, key=lambda r: (r.info.start_time, r.info.run_id))
        return runs[0].info.run_id if runs else None

    def open_parent(self, experiment_id: str, study: str, params: dict) -> str:
        """The study's parent run, created on first use and marked RUNNING while a sweep works."""
        parent = self.find_parent(experiment_id)
        if parent is None:
            run = self.client.create_run(experiment_id, run_name=study, tags={ROLE_TAG: PARENT_ROLE, STUDY_TAG: study})
            self.client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()])
            parent = self.find_parent(experiment_id)
            if parent != run.info.run_id:
                # Two workers raced to create it; keep the oldest, drop ours.
                self.client.delete_run(run.info.run_id)
        else:
            self.client.update_run(parent, status="RUNNING")
        return parent

    def close_parent(self, parent_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(parent_id, status=status)

    def start_trial(self, parent: ParentRun, name: str, number: int, params: dict, stage: str) -> str:
        """A nested run for one trial, named as the trial is everywhere else (trial-007, finetune-000)."""
        tags = {"optuna.trial_number": str(number), STATE_TAG: "RUNNING"}
        return self._start_child(parent, name, TRIAL_ROLE, stage, params, tags)

    def _start_child(self, parent: ParentRun, name: str, role: str, stage: str, params: dict, tags: dict) -> str:
        """A run nested under the study's parent run, with its role, study and stage tags and `params`."""
        tags = {"mlflow.parentRunId": parent.run_id, ROLE_TAG: role, STUDY_TAG: parent.study, STAGE_TAG: stage, **tags}
        run = self.client.create_run(parent.experiment_id, run_name=name, tags=tags)
        self.log_params(run.info.run_id, params)
        return run.info.run_id

    def running_trials(self, study: str, stage: str, number: int | None = None) -> dict[int, str]:
        """The RUNNING trial runs of `stage` in `study`'s experiment (of trial `number` only, if given):
        trial number -> run id."""
        experiment_id = self.experiment_id(study, create=False)
        if experiment_id is None or "'" in study:  # a quote would end the filter's string
            return {}
        query = f"tags.`{STUDY_TAG}` = '{study}' AND tags.`{STAGE_TAG}` = '{stage}' AND attributes.status = 'RUNNING'"
        if number is not None:
            query += f" AND tags.`optuna.trial_number` = '{number}'"
        runs = self.client.search_runs([experiment_id], filter_string=query)
        return {int(r.data.tags["optuna.trial_number"]): r.info.run_id for r in runs}

    def log_lineage(self, run_id: str, splits, tags: dict[str, str]) -> None:
        """The splits as MLflow dataset inputs (the UI's Datasets column), and the lineage tags."""
        contexts = {"train": "training", "validation": "validation", "test": "testing"}
        inputs = [
            DatasetInput(
                Dataset(
                    split.name,
                    split.digest,
                    "local",
                    json.dumps({"uri": split.source}),
                    None,
                    json.dumps(split.profile),
                ),
                tags=[InputTag(MLFLOW_DATASET_CONTEXT, contexts.get(split.name, split.name))],
            )
            for split in splits
        ]
        self.client.log_inputs(run_id, datasets=inputs)
        self.set_tags(run_id, tags)

    @contextmanager
    def system_metrics(self, run_id: str, enabled: bool = True):
        """MLflow's own system metrics (CPU, memory, disk, network, and the GPU where there is one, as
        `system/...`) on `run_id` while the block runs; every MLFLOW_SYSTEM_METRICS_* variable applies."""
        if not enabled:
            yield
            return
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, resume_logging=True, tracking_uri=self.tracking_uri)
        monitor.start()
        try:
            yield
        finally:
            monitor.finish()

    def log_params(self, run_id: str, params: dict) -> None:
        self.client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
        """All of one step's metrics in one call."""
        self.client.log_batch(run_id, metrics=_metrics(metrics, step))

    def log_epoch(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        """One epoch's metrics. To a server they are sent in order by a background thread, so training
        never waits on an HTTP round trip; end_trial waits for every epoch before closing the run.
        (MLflow's own `synchronous=False` drains its whole queue on every set_terminated, 0.7 s a trial.)"""
        if self._sender is None:  # a local store: a write takes milliseconds
            self.log_metrics(run_id, metrics, step)
            return
        self._pending.setdefault(run_id, []).append(self._sender.submit(self.log_metrics, run_id, metrics, step))

    def log_file(self, run_id: str, path: str | Path, folder: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path=folder)

    def log_text(self, run_id: str, text: str, name: str) -> None:
        self.client.log_text(run_id, text, name)

    def set_tags(self, run_id: str, tags: dict[str, object]) -> None:
        self.client.log_batch(run_id, tags=[RunTag(key, str(value)) for key, value in tags.items()])

    def mark_winner(self, parent: ParentRun, winner: TrialRecord | None, tolerance: float) -> None:
        """Tag the winner's run (and only it: a `best` under another tolerance moves the tag), and the
        parent run with which trial won under which rule."""
        winner_id = winner.run_id if winner is not None else None
        earlier = self.client.search_runs([parent.experiment_id], filter_string=f"tags.`{WINNER_TAG}` = 'true'")
        for run in earlier:
            if run.info.run_id != winner_id:
                self.client.delete_tag(run.info.run_id, WINNER_TAG)
        if winner_id is None:
            return
        self.set_tags(winner_id, {WINNER_TAG: "true"})
        tags = {"sweep.winner_trial": winner.name, "sweep.winner_run_id": winner_id, "sweep.rule": rule_text(tolerance)}
        self.set_tags(parent.run_id, {**tags, "sweep.tolerance": tolerance})

    def end_trial(self, run_id: str, state: str, reason: str = "") -> None:
        """Close a trial's run with the status that matches its Optuna state (after its epochs landed),
        with the reason a trial was pruned or failed as a tag and as the run's description. MLflow has
        no status for "stopped early on purpose": a pruned trial's run is KILLED like an interrupted
        one, so its tag and description say PRUNED."""
        for sent in self._pending.pop(run_id, []):
            sent.result()  # raises what sending it raised
        tags: dict[str, object] = {STATE_TAG: state}
        if state == "PRUNED":
            tags["sweep.stop_reason"] = reason
            tags[NOTE_TAG] = (
                f"**Pruned**, stopped early on purpose (not a crash): {reason}. MLflow shows the run as "
                f"KILLED; the tag `{STATE_TAG}` says PRUNED. Its metrics and checkpoint are from its best epoch."
            )
        elif state == "FAIL":
            tags["sweep.error"] = reason[:5000]
            tags[NOTE_TAG] = f"**Failed**: {reason[:500]}. The trial is FAIL in Optuna and never wins."
        self.set_tags(run_id, tags)
        self.client.set_terminated(run_id, status=RUN_STATUS.get(state, "FAILED"))

    def latest_metrics(self, run_id: str) -> dict[str, float]:
        return self.client.get_run(run_id).data.metrics

    def fetch_checkpoint(self, record: TrialRecord) -> dict:
        """The trial's checkpoint (its head, and for stage 2 its fine-tuned blocks), from its run."""
        if not record.run_id:
            raise CheckpointError(f"{record.name} has no MLflow run to take its checkpoint from")
        return self.run_checkpoint(record.run_id)

    def run_checkpoint(self, run_id: str) -> dict:
        """The checkpoint a trial's (or a refit's) run logged."""
        with tempfile.TemporaryDirectory() as tmp:
            path = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=CHECKPOINT_ARTIFACT, dst_path=tmp, tracking_uri=self.tracking_uri
            )
            return load_checkpoint(path, kind=HEAD)

    def start_refit(self, parent: ParentRun, name: str, params: dict, chosen: TrialRecord) -> str:
        """A nested run for the refit of the chosen trial `chosen` (sweep.refit)."""
        tags = {
            REFIT_OF_TAG: chosen.run_id,
            NOTE_TAG: (
                f"**Refit** of {chosen.name}: its configuration trained again on {TRAINED_ON} for its "
                f"best epoch count ({chosen.best_epoch}). Not a trial: it has no val_acc of its own (it trained "
                f"on validation); the rule chose {chosen.name} by its val_acc {chosen.val_acc:.3f}."
            ),
        }
        return self._start_child(parent, name, REFIT_ROLE, chosen.stage, params, tags)

    def find_refit(self, experiment_id: str, chosen: TrialRecord) -> str | None:
        """The FINISHED refit run of the chosen trial, if there is one (the newest)."""
        query = f"tags.`{REFIT_OF_TAG}` = '{chosen.run_id}' AND attributes.status = 'FINISHED'"
        runs = self.client.search_runs([experiment_id], filter_string=query, order_by=["attributes.start_time DESC"])
        return runs[0].info.run_id if runs else None


UI_ADDRESS = "http://127.0.0.1:5000"  # where `mlflow ui` (and `make ui`) serves by default


def browse_hint(tracker: Tracker, study: str) -> str:
    """How to see this study's runs: the command that serves this store (a plain `mlflow ui` would read
    ./mlflow.db, not ours), then the address of the experiment's runs page."""
    experiment_id = tracker.experiment_id(study, create=False)
    # MLflow 3.17's UI decides GenAI vs model-training view by a switch it keeps in the browser
    # (GenAI by default), over the experiment's kind tag; this query parameter sets the switch.
    page = f"/#/experiments/{experiment_id}/runs?workflowType=machine_learning" if experiment_id else ""
    shown_uri = mask_url(tracker.tracking_uri)
    if urlparse(tracker.tracking_uri).scheme in ("http", "https"):
        return f"open {shown_uri.rstrip('/')}{page}"
    command = f"mlflow ui --backend-store-uri {shown_uri}"
    if tracker.tracking_uri == default_tracking_uri() and Path("Makefile").is_file():
        command = f"make ui (= {command})"  # in the project folder, its target serves this very store
    return f"{command}, then open {UI_ADDRESS}{page}"
