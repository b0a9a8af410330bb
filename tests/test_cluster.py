"""Several machines on one study, for real: a PostgreSQL storage, an MLflow server with basic-auth
and artifact serving, and one process per "machine" with its own working folder, HOME and cache.
Nothing is shared between the machines but the data folder, the two URLs and the credentials."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import optuna
import pytest
import requests
from click.testing import CliRunner
from mlflow import MlflowClient
from mlflow.entities import ViewType
from sweep_helpers import PLAIN, assert_one_error, checkpoint_files, data_args

from bench.images import make_split
from bench.servers import free_port, mlflow_server, postgres_cluster, wait_for
from sweep.cli import cli
from sweep.stores import study_lock

pytestmark = pytest.mark.slow

PG_PASSWORD = "pg-Secret-4e1b7"
ADMIN_PASSWORD = "mlflow-Admin-9c2f3"
STUDY, TRIALS = "shared", 6


@pytest.fixture(scope="module")
def postgres():
    with postgres_cluster(PG_PASSWORD) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def server(postgres, tmp_path_factory):
    backend = postgres.url(postgres.create_database("mlflow"))
    with mlflow_server(
        tmp_path_factory.mktemp("server"), backend, {**os.environ, "PGPASSWORD": PG_PASSWORD}, ADMIN_PASSWORD
    ) as srv:
        yield srv


@pytest.fixture(scope="module")
def storage(postgres) -> str:
    """The Optuna database's URL as the machines use it: no password (they read PGPASSWORD)."""
    return postgres.url(postgres.create_database("optuna"))


@pytest.fixture(scope="module")
def shared_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shared-data")
    make_split(root / "train", per_class=4)
    make_split(root / "validation", per_class=2, seed=1000)
    return root


@dataclass(frozen=True)
class Machine:
    """One "machine": a working folder, a HOME and a cache of its own; the stores' URLs and the
    credentials come from the environment, as the README tells users to set them."""

    root: Path
    env: dict[str, str]

    def command(self, *argv) -> list[str]:
        return [sys.executable, "-m", "sweep", *map(str, argv)]

    def start(self, *argv) -> subprocess.Popen:
        return subprocess.Popen(
            self.command(*argv),
            cwd=self.root / "work",
            env=self.env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )

    def run(self, *argv) -> subprocess.CompletedProcess:
        return subprocess.run(
            self.command(*argv), cwd=self.root / "work", env=self.env, text=True, capture_output=True, timeout=600
        )


def machine(root: Path, storage: str, server, **overrides: str | None) -> Machine:
    for folder in ("work", "home", "cache"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    own = ("MLFLOW_", "OPTUNA_", "PG", "CLOTHING_")  # nothing of this test process's stores leaks in
    env = {k: v for k, v in os.environ.items() if not k.startswith(own)}
    env.update(
        HOME=str(root / "home"),
        CLOTHING_CACHE_DIR=str(root / "cache"),
        OPTUNA_STORAGE=storage,
        PGPASSWORD=PG_PASSWORD,
        MLFLOW_TRACKING_URI=server.uri,
        **server.credentials(),
        SWEEP_HEARTBEAT_SECONDS="1",  # a killed machine's trial goes stale in seconds
        OMP_NUM_THREADS="1",
    )
    for key, value in overrides.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return Machine(root, env)


def with_password(storage: str) -> str:
    return storage.replace("sweep@", f"sweep:{PG_PASSWORD}@")


def read_study(storage: str, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=with_password(storage))


def runs_of(server, study: str):
    """(client, parent runs, trial runs) of the study's experiment, read with the admin login."""
    with mock.patch.dict(os.environ, server.credentials()):
        client = MlflowClient(server.uri)
        experiment = client.get_experiment_by_name(study)
        runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("sweep.role") == "study"]
    trials = [r for r in runs if r.data.tags.get("sweep.role") == "trial"]
    return client, parents, trials


def sweep_options(data: Path, weights: Path, study: str, trials: int, epochs: int) -> list[str]:
    return [
        *PLAIN,
        *data_args(data, weights),
        "--study",
        study,
        "--trials",
        trials,
        "--epochs",
        epochs,
        "--pruner",
        "none",
    ]


NO_CREDENTIALS = dict.fromkeys(
    ("PGPASSWORD", "OPTUNA_STORAGE", "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
)


def login_url(server) -> str:
    return server.uri.replace("http://", f"http://admin:{ADMIN_PASSWORD}@")


@dataclass(frozen=True)
class Machines:
    machines: list[Machine]
    terminal: list[str]  # what each printed


@pytest.fixture(scope="module")
def three_machines(storage, server, shared_data, tiny_weights, tmp_path_factory) -> Machines:
    """Three machines started at the same moment on one study (the third with --jobs 2), stage 2 on.
    The first has both passwords in the URLs on its command line, the habit the README warns against
    (test_a_clean_folder_... checks that neither reaches the record); the others read them from the
    environment, as the README says."""
    root = tmp_path_factory.mktemp("machines")
    options = [*sweep_options(shared_data, tiny_weights, STUDY, TRIALS, 8), "--finetune-blocks", 1]
    options += ["--finetune-epochs", 2, "--quiet"]
    machines = [machine(root / "machine-0", storage, server, **NO_CREDENTIALS)]
    machines += [machine(root / f"machine-{i}", storage, server) for i in (1, 2)]
    urls = ["--storage", with_password(storage), "--tracking-uri", login_url(server)]
    processes = [m.start("run", *options, *extra) for m, extra in zip(machines, (urls, [], ["--jobs", 2]))]
    terminal = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr
        terminal.append(stdout + stderr)
    return Machines(machines, terminal)


def test_three_machines_finish_one_study_with_exactly_its_target_and_one_run_per_trial(three_machines, storage, server):
    study = read_study(storage, STUDY)
    finished = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    history = " ".join(
        f"{t.number}:{t.state.name}:{t.datetime_start:%S.%f}-{t.datetime_complete:%S.%f}" for t in study.trials
    )
    assert len(finished) == TRIALS, history  # the database-level lock: no machine overshoots
    configurations = [tuple(sorted(t.params.items())) for t in study.trials]
    assert len(set(configurations)) == len(configurations)
    finetune = read_study(storage, f"{STUDY}.finetune")
    assert [t.state.name for t in finetune.trials] == ["COMPLETE"]  # stage 2 ran once, not once per machine

    client, parents, trials = runs_of(server, STUDY)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert {r.data.tags["mlflow.parentRunId"] for r in trials} == {parents[0].info.run_id}
    names = sorted(r.info.run_name for r in trials)
    assert names == sorted([f"trial-{t.number:03d}" for t in study.trials] + ["finetune-000"])
    assert {r.info.status for r in trials} == {"FINISHED"}
    # Checkpoints went over HTTP to the server's artifact store, not into any machine's folder.
    with mock.patch.dict(os.environ, server.credentials()):
        for run in trials:
            assert checkpoint_files(client, run) == ["head.pt"]
    assert len(list(server.artifacts.rglob("head.pt"))) == len(trials)
    for m in three_machines.machines:
        assert not (m.root / "work" / "mlruns").exists()


HOLD_THE_LOCK = """
import sys, time
from sweep.stores import study_lock
study_lock(sys.argv[1], sys.argv[2]).acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_the_study_lock_is_one_lock_for_every_machine_and_dies_with_its_holder(storage):
    url = with_password(storage)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_THE_LOCK, url, "guarded"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        other = study_lock(url, "another-study")
        other.acquire()  # another study's lock is free
        other.release()
        waiter, acquired = study_lock(url, "guarded"), threading.Event()
        threading.Thread(target=lambda: (waiter.acquire(), acquired.set()), daemon=True).start()
        assert not acquired.wait(2)  # blocked while another process holds the study's lock
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert acquired.wait(30)  # the server dropped the lock with the killed holder's connection
    waiter.release()


def test_a_clean_folder_with_only_the_urls_reads_everything_back_and_no_password_reaches_the_record(
    three_machines, postgres, storage, server, shared_data, tiny_weights, tmp_path
):
    """A fresh folder with nothing but the two URLs, both passwords in them (the habit the README warns
    against), lists, exports, registers and predicts; neither password shows up in anything the
    sweep wrote (the record, the artifacts, the databases) or printed, here or on the machines."""
    fresh = machine(tmp_path / "fresh", storage, server, **NO_CREDENTIALS)
    urls = ["--study", STUDY, "--storage", with_password(storage), "--tracking-uri", login_url(server)]
    listed = fresh.run("trials", *urls[:4], "--format", "json")
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert len(rows) == TRIALS + 1 and sum(row["winner"] is True for row in rows) == 1
    as_csv = fresh.run("trials", *urls[:4], "--format", "csv")
    best = fresh.run(
        "best", *data_args(shared_data, tiny_weights), *urls, "--export", "model.pt", "--register", "shared-winner"
    )
    assert best.returncode == 0, best.stderr
    assert "Registered" in best.stdout and "models:/shared-winner/1" in best.stdout
    image = next((shared_data / "validation").rglob("*.jpg"))
    predicted = fresh.run("predict", "model.pt", image)
    assert predicted.returncode == 0, predicted.stderr
    assert str(image) in predicted.stdout and len(predicted.stdout.splitlines()) == 4
    assert sorted(os.listdir(fresh.root / "work")) == ["model.pt"]  # everything else came over HTTP
    unreachable = f"http://admin:{ADMIN_PASSWORD}@127.0.0.1:{free_port()}"
    failed = fresh.run("best", *urls[:4], "--tracking-uri", unreachable)

    client, _, trials = runs_of(server, STUDY)
    winner = [r for r in trials if r.data.tags.get("sweep.winner") == "true"]
    assert len(winner) == 1 and winner[0].info.run_name == next(r["trial"] for r in rows if r["winner"])
    with mock.patch.dict(os.environ, server.credentials()):
        versions = client.search_model_versions("name = 'shared-winner'")
    assert [v.run_id for v in versions] == [winner[0].info.run_id]

    terminal = [*three_machines.terminal, *(r.stdout + r.stderr for r in (listed, as_csv, best, predicted, failed))]
    assert [t.count("Error:") for t in terminal[3:]] == [0, 0, 0, 0, 1], terminal
    assert "http://admin:***@127.0.0.1:" in terminal[-1]
    record = everything_in_the_record(server, STUDY)
    artifacts = b"".join(path.read_bytes() for path in server.artifacts.rglob("*") if path.is_file())
    databases = postgres.dump("mlflow") + postgres.dump("optuna")
    # The search has something to search: the record holds the sweep, the artifacts its files.
    assert "finetune-000" in record and STUDY in databases and b"val_acc" in artifacts
    for secret in (PG_PASSWORD, ADMIN_PASSWORD):
        assert all(secret not in text for text in terminal)
        assert secret not in record
        assert secret.encode() not in artifacts
        assert secret not in databases


def test_a_machine_killed_mid_trial_is_failed_by_another_machine_and_the_study_reaches_its_target(
    storage, server, shared_data, tiny_weights, tmp_path
):
    options = sweep_options(shared_data, tiny_weights, "killed", 2, 100)
    victim = machine(tmp_path / "victim", storage, server).start("run", *options, "--quiet")

    def running_trial():
        try:
            running = read_study(storage, "killed").get_trials(states=(optuna.trial.TrialState.RUNNING,))
        except KeyError:  # the study does not exist yet
            return None
        return running[0] if running and len(running[0].intermediate_values) >= 3 else None

    killed = wait_for(running_trial, what="a trial in progress on the victim")
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    _, _, trials = runs_of(server, "killed")
    assert {r.info.run_name: r.info.status for r in trials}[f"trial-{killed.number:03d}"] == "RUNNING"

    survivor = machine(tmp_path / "survivor", storage, server).run("run", *options, "--quiet")
    assert survivor.returncode == 0, survivor.stderr

    states = {t.number: t.state.name for t in read_study(storage, "killed").trials}
    assert states[killed.number] == "FAIL"
    assert sorted(states.values()).count("COMPLETE") == 2 and len(states) == 3
    _, parents, trials = runs_of(server, "killed")
    by_name = {r.info.run_name: r for r in trials}
    assert len(trials) == len(states)  # one run per trial, the failed one included
    failed = by_name[f"trial-{killed.number:03d}"]
    assert failed.info.status == "FAILED" and "heartbeat" in failed.data.tags["sweep.error"]
    assert [p.info.status for p in parents] == ["FINISHED"]


def test_the_server_refuses_requests_without_credentials(server):
    search = f"{server.uri}/api/2.0/mlflow/experiments/search?max_results=1"
    assert requests.get(search, timeout=10).status_code == 401
    assert requests.get(search, auth=("admin", "wrong"), timeout=10).status_code == 401
    assert requests.get(search, auth=("admin", ADMIN_PASSWORD), timeout=10).status_code == 200


BAD_STORES = {
    "wrong password": (
        lambda pg, srv: ({"--storage": pg.url("optuna", password="not-the-password")}, {"PGPASSWORD": None}),
        ("postgresql://sweep:***@127.0.0.1", "password authentication failed", "PGPASSWORD"),
    ),
    "wrong port": (
        lambda pg, srv: ({"--storage": f"postgresql://sweep@127.0.0.1:{free_port()}/optuna"}, {}),
        ("cannot open the Optuna storage postgresql://sweep@127.0.0.1:", "host and port"),
    ),
    "missing database": (
        lambda pg, srv: ({"--storage": pg.url("no_such_db")}, {}),
        ("/no_such_db", "does not exist", "createdb"),
    ),
    "server down": (
        lambda pg, srv: ({"--tracking-uri": f"http://127.0.0.1:{free_port()}"}, {}),
        ("cannot reach the MLflow tracking store http://127.0.0.1:", "--tracking-uri"),
    ),
    "wrong server password": (
        lambda pg, srv: ({}, srv.credentials("wrong")),
        ("server {uri} refused the credentials", "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"),
    ),
}


@pytest.mark.parametrize("case", list(BAD_STORES))
def test_a_bad_store_is_one_clear_error_naming_it_and_the_fix(
    case, postgres, storage, server, shared_data, tiny_weights, tmp_path
):
    make_case, fragments = BAD_STORES[case]
    options, env_changes = make_case(postgres, server)
    env = {"OPTUNA_STORAGE": storage, "PGPASSWORD": PG_PASSWORD, "MLFLOW_TRACKING_URI": server.uri}
    env.update(server.credentials())
    env.update(env_changes)
    before = optuna.get_all_study_names(with_password(storage))
    argv = ["run", *sweep_options(shared_data, tiny_weights, "bad-input", 1, 1), "--cache-dir", tmp_path / "cache"]
    argv += [item for pair in options.items() for item in pair]
    result = CliRunner().invoke(cli, [str(a) for a in argv], env=env)
    assert_one_error(result, *(f.format(uri=server.uri) for f in fragments))
    assert PG_PASSWORD not in result.output and "not-the-password" not in result.output
    assert optuna.get_all_study_names(with_password(storage)) == before  # nothing created, nothing lost
    assert not (tmp_path / "cache").exists()  # it stopped before extracting any feature


def everything_in_the_record(server, study: str) -> str:
    """Every param, tag and metric name of the study's runs (deleted ones too), as MLflow serves them."""
    with mock.patch.dict(os.environ, server.credentials()):
        client = MlflowClient(server.uri)
        experiment = client.get_experiment_by_name(study)
        runs = client.search_runs([experiment.experiment_id], run_view_type=ViewType.ALL)
        models = client.search_logged_models(experiment_ids=[experiment.experiment_id])
    parts = [repr(experiment.tags)]
    for run in runs:
        parts += [run.info.run_name, repr(run.data.params), repr(run.data.tags), repr(sorted(run.data.metrics))]
    parts += [repr(model.params) + repr(model.tags) for model in models]
    return "\n".join(parts)
