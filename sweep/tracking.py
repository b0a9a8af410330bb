"""MLflow tracking: the only module that imports mlflow.

Layout: one experiment per study; one parent run per study, found again by tag so a resumed or
parallel study never gets a second parent; one nested child run per trial named trial-NNN. It uses
MlflowClient with explicit run ids, not the fluent API's global active run, so several trials or
processes can log side by side.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from clothing.data import shown
from sweep.stores import mask_url, not_utf8

ROLE_TAG = "sweep.role"
STUDY_TAG = "sweep.study"
STAGE_TAG = "stage"  # head (stage 1, a sweep trial) or finetune (stage 2)
WINNER_TAG = "sweep.winner"  # on the winner's run only
PARENT_ROLE, TRIAL_ROLE = "study", "trial"
REGISTRY_FORMATS = ("pickle", "pt2")  # mlflow.pytorch serialization formats `best --register` offers
# Optuna's final state -> the MLflow run status that says the same thing.
RUN_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}


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

    def start_trial(
        self, experiment_id: str, parent_id: str, study: str, name: str, number: int, params: dict, stage: str
    ) -> str:
        """A nested run for one trial, named as the trial is everywhere else (trial-007, finetune-000)."""
        tags = {
            "mlflow.parentRunId": parent_id,
            ROLE_TAG: TRIAL_ROLE,
            STUDY_TAG: study,
            STAGE_TAG: stage,
            "optuna.trial_number": str(number),
            "optuna.state": "RUNNING",
        }
        run = self.client.create_run(experiment_id, run_name=name, tags=tags)
        self.log_params(run.info.run_id, params)
        return run.info.run_id

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

    def mark_winner(
        self, experiment_id: str, run_id: str, parent_id: str | None, name: str, rule: str, tolerance: float
    ) -> None:
        """Tag the winner's run (and only it: a `best` under another tolerance moves the tag), and the
        parent run with which trial won under which rule."""
        earlier = self.client.search_runs([experiment_id], filter_string=f"tags.`{WINNER_TAG}` = 'true'")
        for run in earlier:
            if run.info.run_id != run_id:
                self.client.delete_tag(run.info.run_id, WINNER_TAG)
        self.set_tags(run_id, {WINNER_TAG: "true"})
        if parent_id:
            tags = {"sweep.winner_trial": name, "sweep.winner_run_id": run_id, "sweep.rule": rule}
            self.set_tags(parent_id, {**tags, "sweep.tolerance": tolerance})

    def end_trial(self, run_id: str, state: str, tags: dict[str, object] | None = None) -> None:
        """Close a trial's run with the status that matches its Optuna state (after its epochs landed)."""
        for sent in self._pending.pop(run_id, []):
            sent.result()  # raises what sending it raised
        self.set_tags(run_id, {"optuna.state": state, **(tags or {})})
        self.client.set_terminated(run_id, status=RUN_STATUS.get(state, "FAILED"))

    def run_status(self, run_id: str) -> str:
        return self.client.get_run(run_id).info.status

    def register_model(
        self,
        run_id: str,
        model,
        name: str,
        input_example,
        metadata: dict,
        code_paths: list[str] | None,
        serialization_format: str = "pickle",
    ) -> str:
        """Log `model` on `run_id` as an MLflow PyTorch model (signature from the example) and register
        a new version of `name`; returns the version.

        "pickle" loads as the nn.Module users expect (code_paths ships the model's classes with it),
        and like any pickle it runs code when loaded. "pt2" is torch.export's graph: nothing is
        unpickled, the batch size stays dynamic, but it loads as a GraphModule."""
        import mlflow.pytorch
        import torch
        from mlflow.models import infer_signature

        with torch.no_grad():
            output = model(torch.from_numpy(input_example)).numpy()
        mlflow.set_tracking_uri(self.tracking_uri)
        status = self.run_status(run_id)
        # The fluent API logs models to an active run: reopen the trial's run, then restore its status.
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pytorch.log_model(
                model,
                name="model",
                signature=infer_signature(input_example, output),
                input_example=input_example,
                metadata=metadata,
                registered_model_name=name,
                serialization_format=serialization_format,
                code_paths=code_paths,
            )
        self.client.set_terminated(run_id, status=status)
        return str(info.registered_model_version)

    def download(self, run_id: str, artifact_path: str, dst: str | Path) -> Path:
        return Path(
            mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=artifact_path, dst_path=str(dst), tracking_uri=self.tracking_uri
            )
        )


def ui_command(tracking_uri: str) -> str:
    """The exact command that browses this store."""
    shown = mask_url(tracking_uri)
    if urlparse(tracking_uri).scheme in ("http", "https"):
        return f"open {shown}"
    return f"mlflow ui --backend-store-uri {shown}"
