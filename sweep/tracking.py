"""MLflow tracking: with `sweep.registry` and `sweep.serving` beside it, the only modules that import mlflow.

Layout: one experiment per study; one parent run per study, found again by tag so a resumed or
parallel study never gets a second parent; one nested run per trial named after it (trial-007,
finetune-000), opened, filled and closed by `Tracker.trial_run`. It uses MlflowClient with explicit
run ids, not the fluent API's global active run, so several trials or processes can log side by side.
`Tracker` keeps to runs and their records; what a sweep says about itself as a whole (the
experiment's description, the lineage, the winner's tag) are the functions below it.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import mlflow
import optuna
from mlflow import MlflowClient
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT
from optuna.exceptions import UpdateFinishedTrialError

from clothing.checkpoint import HEAD, CheckpointError, load_checkpoint
from clothing.data import shown
from sweep.plots import study_plots
from sweep.ranking import Ranking, TrialRecord, rows_to_csv, rule_text
from sweep.storage import TAKEN_OVER_REASON
from sweep.stores import mask_url, not_utf8, sqlite_path

ROLE_TAG = "sweep.role"
STUDY_TAG = "sweep.study"
STAGE_TAG = "stage"  # head (stage 1, a sweep trial) or finetune (stage 2)
WINNER_TAG = "sweep.winner"  # on the winner's run only
STATE_TAG = "sweep.state"  # a trial run's Optuna state: RUNNING, then COMPLETE, PRUNED or FAIL
NUMBER_TAG = "optuna.trial_number"
NOTE_TAG = "mlflow.note.content"  # the markdown description MLflow's UI shows for a run or an experiment
# MLflow 3's UI shows an experiment of this kind as model training, not GenAI (unless the UI's own
# GenAI/model-training switch overrides it: see browse_hint).
KIND_TAG, TRAINING_KIND = "mlflow.experimentKind", "custom_model_development"
PARENT_ROLE, TRIAL_ROLE = "study", "trial"
TEST_METRIC = "best/test_acc"  # the winner's model scored on test/ (by `best`), on its own run
CHECKPOINT_FILE = "head.pt"  # a trial's checkpoint, the one file of its logged model
CHECKPOINT_ARTIFACT = "checkpoint/head.pt"  # where runs from before logged models keep it
LOGGED_MODEL = "models:/"  # `models:/<model_id>`, as MLflow names a logged model
CHECKPOINT_TYPE = "checkpoint"  # the model_type of a trial's logged checkpoint (the champion's is MLflow's own)
RUN_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}  # Optuna's state -> MLflow's
UI_ADDRESS = "http://127.0.0.1:5000"  # where `mlflow ui` (and `make ui`) serves by default


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


def ending(exc: BaseException) -> tuple[str, str]:
    """(the Optuna state, why) of a trial whose run ends with `exc`."""
    if isinstance(exc, optuna.TrialPruned):
        return "PRUNED", str(exc) or "pruned"
    if isinstance(exc, UpdateFinishedTrialError):  # another worker failed the trial while it ran
        return "FAIL", TAKEN_OVER_REASON
    if isinstance(exc, KeyboardInterrupt):
        return "FAIL", "interrupted (Ctrl-C)"
    return "FAIL", f"{type(exc).__name__}: {exc}"


class Tracker:
    """A study's view of one MLflow tracking store: its runs and their records."""

    def __init__(self, tracking_uri: str) -> None:
        self.tracking_uri = tracking_uri
        if not_utf8(tracking_uri):
            raise TrackingError(
                f"the MLflow tracking store {shown(tracking_uri)} is not valid UTF-8; put it in a folder whose name is"
            )
        self.database = sqlite_path(tracking_uri)
        if self.database is not None:
            # The default store: keep the database's folder (and so the artifacts beside it) ready.
            self.database.parent.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.remote = urlparse(tracking_uri).scheme in ("http", "https")
        self._sender = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlflow-epochs") if self.remote else None
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

    def experiment_id(self, study: str, create: bool = True) -> str | None:
        experiment = self.client.get_experiment_by_name(study)
        if experiment is not None:
            return experiment.experiment_id
        if not create:
            return None
        # With a local SQLite store, keep artifacts in a folder beside the database, so all run state
        # lives in one folder; a server decides for itself.
        artifacts = (self.database.parent / "artifacts").resolve().as_uri() if self.database else None
        try:
            return self.client.create_experiment(study, artifact_location=artifacts)
        except MlflowException:
            # Another worker created it between our lookup and create.
            return self.client.get_experiment_by_name(study).experiment_id

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
            self.log(run.info.run_id, params=params)
            parent = self.find_parent(experiment_id)
            if parent != run.info.run_id:
                # Two workers raced to create it; keep the oldest, drop ours.
                self.client.delete_run(run.info.run_id)
        else:
            self.client.update_run(parent, status="RUNNING")
        return parent

    def close_parent(self, parent_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(parent_id, status=status)

    @contextmanager
    def trial_run(self, parent: ParentRun, name: str, number: int, stage: str, params: dict) -> Iterator[str]:
        """A run nested under the study's parent for one trial, named as the trial is everywhere else,
        with `params`; closed on every way out of the block with the status that matches how it ended
        (`ending`): FINISHED, KILLED for a pruned trial, FAILED with the reason."""
        tags = {
            "mlflow.parentRunId": parent.run_id,
            ROLE_TAG: TRIAL_ROLE,
            STUDY_TAG: parent.study,
            STAGE_TAG: stage,
            NUMBER_TAG: str(number),
            STATE_TAG: "RUNNING",
        }
        run_id = self.client.create_run(parent.experiment_id, run_name=name, tags=tags).info.run_id
        try:
            self.log(run_id, params=params)
            yield run_id
        except BaseException as exc:
            self.end_trial(run_id, *ending(exc))
            raise
        self.end_trial(run_id, "COMPLETE")

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
        self.log(run_id, tags=tags)
        self.client.set_terminated(run_id, status=RUN_STATUS.get(state, "FAILED"))

    def running_trials(self, study: str, stage: str, number: int | None = None) -> dict[int, str]:
        """The RUNNING trial runs of `stage` in `study`'s experiment (of trial `number` only, if given):
        trial number -> run id."""
        experiment_id = self.experiment_id(study, create=False)
        if experiment_id is None or "'" in study:  # a quote would end the filter's string
            return {}
        query = f"tags.`{STUDY_TAG}` = '{study}' AND tags.`{STAGE_TAG}` = '{stage}' AND attributes.status = 'RUNNING'"
        if number is not None:
            query += f" AND tags.`{NUMBER_TAG}` = '{number}'"
        runs = self.client.search_runs([experiment_id], filter_string=query)
        return {int(r.data.tags[NUMBER_TAG]): r.info.run_id for r in runs}

    def log(self, run_id: str, params: dict | None = None, metrics: dict | None = None, tags: dict | None = None):
        """Params, metrics (of no step) and tags of a run, in one call."""
        self.client.log_batch(
            run_id,
            metrics=_metrics(metrics or {}, None),
            params=[Param(k, str(v)) for k, v in (params or {}).items()],
            tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()],
        )

    def log_epoch(self, run_id: str, metrics: dict[str, float], step: int, timestamp: int) -> None:
        """One epoch's metrics, at `timestamp` (ms; link_metrics names the same points again). To a
        server they are sent in order by a background thread, so training never waits on an HTTP
        round trip; end_trial waits for every epoch before closing the run. (MLflow's own
        `synchronous=False` drains its whole queue on every set_terminated, 0.7 s a trial.)"""

        def send() -> None:
            self.client.log_batch(run_id, metrics=_metrics(metrics, step, timestamp))

        if self._sender is None:  # a local store: a write takes milliseconds
            send()
            return
        self._pending.setdefault(run_id, []).append(self._sender.submit(send))

    def log_file(self, run_id: str, path: str | Path, folder: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path=folder)

    def log_text(self, run_id: str, text: str, name: str) -> None:
        self.client.log_text(run_id, text, name)

    def latest_metrics(self, run_id: str) -> dict[str, float]:
        return self.client.get_run(run_id).data.metrics

    def log_checkpoint(self, run_id: str, folder: Path) -> str:
        """The files in `folder` (a trial's checkpoint) as an MLflow 3 logged model of the trial's run,
        named after it, of type "checkpoint", with its params, and its study, stage and trial number
        as tags: the experiment's Models tab lists it, `search_logged_models` ranks it once
        link_metrics gave it its metrics, and `models:/<model_id>` names it. A light one, as MLflow's
        deep-learning guide records checkpoints: files, no flavour, no environment (only the champion
        `best --register` logs is a full pyfunc). Returns its id."""
        run = self.client.get_run(run_id)
        tags = {k: v for k, v in run.data.tags.items() if k in (STUDY_TAG, STAGE_TAG, NUMBER_TAG)}
        model = self.client.create_logged_model(
            run.info.experiment_id,
            run.info.run_name,
            source_run_id=run_id,
            tags=tags,
            params=run.data.params,
            model_type=CHECKPOINT_TYPE,
        )
        try:
            self.client.log_model_artifacts(model.model_id, str(folder))
        except BaseException:  # the trial fails with the reason; its model must not stay PENDING
            with contextlib.suppress(Exception):
                self.client.finalize_logged_model(model.model_id, "FAILED")
            raise
        self.client.finalize_logged_model(model.model_id, "READY")
        return model.model_id

    def link_metrics(self, run_id: str, model_id: str, metrics: dict[str, float], step: int, timestamp: int) -> None:
        """Link `metrics` at `step` to the logged model: logged on the run with the model's id, at the
        step and timestamp the run has them under already (MLflow keeps one point for the same key,
        step, timestamp and value), so the run's curves gain no second point."""
        self.client.log_batch(run_id, metrics=_metrics(metrics, step, timestamp, model_id))

    def fetch_checkpoint(self, record: TrialRecord) -> dict:
        """The trial's checkpoint (its head, and for stage 2 its fine-tuned blocks): its logged model's,
        or for a run from before logged models, the run's artifact."""
        if record.model_id:
            return self.logged_checkpoint(record.model_id)
        if not record.run_id:
            raise CheckpointError(f"{record.name} has no MLflow run to take its checkpoint from")
        return self._download_checkpoint(run_id=record.run_id, artifact_path=CHECKPOINT_ARTIFACT)

    def logged_checkpoint(self, model_id: str) -> dict:
        """The checkpoint of the logged model `model_id` (`models:/<model_id>`)."""
        try:
            location = self.client.get_logged_model(model_id).artifact_location
        except MlflowException as exc:
            raise CheckpointError(
                f"the MLflow tracking store {mask_url(self.tracking_uri)} has no logged model {model_id!r}; "
                "`python -m sweep trials --wide` lists each trial's model id (or pass --tracking-uri)"
            ) from exc
        return self._download_checkpoint(artifact_uri=f"{location.rstrip('/')}/{CHECKPOINT_FILE}")

    def _download_checkpoint(self, **where: str) -> dict:
        with tempfile.TemporaryDirectory() as tmp:
            path = mlflow.artifacts.download_artifacts(**where, dst_path=tmp, tracking_uri=self.tracking_uri)
            return load_checkpoint(path, kind=HEAD)


def now_ms() -> int:
    return int(time.time() * 1000)


def _metrics(metrics: dict[str, float], step: int | None, timestamp: int | None = None, model_id=None) -> list[Metric]:
    stamp = timestamp or now_ms()
    return [Metric(key, float(value), stamp, step or 0, model_id=model_id) for key, value in metrics.items()]


def describe_experiment(tracker: Tracker, experiment_id: str, description: str) -> None:
    """Open the experiment on the training-runs view, with a description (set again on every run,
    so an experiment from an older version of the tool gets them too)."""
    tracker.client.set_experiment_tag(experiment_id, KIND_TAG, TRAINING_KIND)
    tracker.client.set_experiment_tag(experiment_id, NOTE_TAG, description)


def log_lineage(tracker: Tracker, run_id: str, splits, tags: dict[str, str]) -> None:
    """The splits as MLflow dataset inputs (the UI's Datasets column), and the lineage tags."""
    contexts = {"train": "training", "validation": "validation", "test": "testing"}
    inputs = [
        DatasetInput(
            Dataset(
                split.name, split.digest, "local", json.dumps({"uri": split.source}), None, json.dumps(split.profile)
            ),
            tags=[InputTag(MLFLOW_DATASET_CONTEXT, contexts.get(split.name, split.name))],
        )
        for split in splits
    ]
    tracker.client.log_inputs(run_id, datasets=inputs)
    tracker.log(run_id, tags=tags)


@contextmanager
def system_metrics(tracker: Tracker, run_id: str) -> Iterator[None]:
    """MLflow's own system metrics (CPU, memory, disk, network, and the GPU where there is one, as
    `system/...`) on `run_id` while the block runs, unless MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING is
    false; every MLFLOW_SYSTEM_METRICS_* variable applies."""
    if os.environ.get("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "true").lower() in ("false", "0"):
        yield
        return
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, resume_logging=True, tracking_uri=tracker.tracking_uri)
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()


def mark_winner(tracker: Tracker, parent: ParentRun, winner: TrialRecord | None, tolerance: float) -> None:
    """Tag the winner's run (and only it: a `best` under another tolerance moves the tag), and the
    parent run with which trial won under which rule."""
    winner_id = winner.run_id if winner is not None else None
    earlier = tracker.client.search_runs([parent.experiment_id], filter_string=f"tags.`{WINNER_TAG}` = 'true'")
    for run in earlier:
        if run.info.run_id != winner_id:
            tracker.client.delete_tag(run.info.run_id, WINNER_TAG)
    if winner_id is None:
        return
    tracker.log(winner_id, tags={WINNER_TAG: "true"})
    tags = {"sweep.winner_trial": winner.name, "sweep.winner_run_id": winner_id, "sweep.rule": rule_text(tolerance)}
    tracker.log(parent.run_id, tags={**tags, "sweep.tolerance": tolerance})


def publish(tracker: Tracker, parent: ParentRun, ranking: Ranking, stage1: optuna.Study) -> None:
    """What a sweep shows in MLflow once it has a ranking, all from that one ranking: the winner
    tagged, the parent run's summary (metrics and description), trials.csv and the study plots. The
    winner's test score is the one `best` logged on the winner's own run, if any."""
    winner = ranking.winner
    mark_winner(tracker, parent, winner, ranking.tolerance)
    test_acc = tracker.latest_metrics(winner.run_id).get(TEST_METRIC) if winner and winner.run_id else None
    tracker.log(parent.run_id, metrics=ranking.parent_metrics(test_acc), tags={NOTE_TAG: ranking.description(test_acc)})
    tracker.log_text(parent.run_id, rows_to_csv(ranking.rows()), "trials.csv")
    with tempfile.TemporaryDirectory() as tmp:
        for path in study_plots(stage1, ranking, Path(tmp)):
            tracker.log_file(parent.run_id, path, "plots")


def browse_hint(tracker: Tracker, study: str, default_store: bool = False) -> str:
    """How to see this study's runs: the command that serves this store (a plain `mlflow ui` would read
    ./mlflow.db, not ours), then the address of the experiment's runs page. `default_store`: the store
    is the project's default one, which `make ui` serves."""
    experiment_id = tracker.experiment_id(study, create=False)
    # MLflow 3.17's UI decides GenAI vs model-training view by a switch it keeps in the browser
    # (GenAI by default), over the experiment's kind tag; this query parameter sets the switch.
    page = f"/#/experiments/{experiment_id}/runs?workflowType=machine_learning" if experiment_id else ""
    shown_uri = mask_url(tracker.tracking_uri)
    if tracker.remote:
        return f"open {shown_uri.rstrip('/')}{page}"
    command = f"mlflow ui --backend-store-uri {shown_uri}"
    if default_store and Path("Makefile").is_file():
        command = f"make ui (= {command})"  # in the project folder, its target serves this very store
    return f"{command}, then open {UI_ADDRESS}{page}"
