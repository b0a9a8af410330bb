"""The soak: many `sweep run` workers on one study, on PostgreSQL and an authenticated MLflow server,
while workers are SIGKILLed (and replaced, as a supervisor would), PostgreSQL restarts and the tracking
server goes away for a while. Then the record is checked. `tests/test_soak.py` runs it small in
`make test`; `python -m bench.soak` (`make bench-soak`) runs it at 1, 4, 8 and 16 processes and prints
per size: trials per second against one process (faults included), the peak of connections to the
Optuna database against max_connections, and the share of the finished workers' time spent in
tracking and storage calls (bench.soak_worker).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import click
import optuna
import psutil
import psycopg
import torch
from mlflow import MlflowClient
from mlflow.entities import ViewType

from bench import PLAIN
from bench.images import calibrated_backbone, make_split
from bench.servers import Postgres, free_port, mlflow_server, postgres_cluster, spawned_workers, wait_for

STUDY = "soak"
PG_PASSWORD, ADMIN_PASSWORD = "soak-pg-Secret-1", "soak-Admin-Secret-2"
FINISHED = ("COMPLETE", "PRUNED")


@dataclass(frozen=True)
class SoakPlan:
    workers: int  # machines (`sweep run` processes) on the study at any time
    trials: int  # the study's target of finished stage-1 trials
    jobs: int = 1  # each one's --jobs: it spawns jobs - 1 worker processes once it has reached its stores
    epochs: int = 3
    kills: int = 8  # workers SIGKILLed in all (one event kills two at once)
    pg_restart: bool = True  # with jobs > 1: timed into a replacement's worker start-ups (restart_postgres)
    outage: float = 30.0  # seconds the tracking server is down; 0: no outage
    timeout: float = 900.0
    entry: tuple[str, ...] = ("-m", "sweep")  # what a worker runs (the bench times calls in a wrapper)


@dataclass
class SoakLog:
    """What happened: the faults dealt, the processes started, what they printed."""

    killed: int = 0
    double_kills: int = 0
    pg_restarts: int = 0
    workers_started_into_outage: int = 0  # --jobs workers whose first call met the restart
    outages: int = 0
    starts: int = 0
    exits: Counter = field(default_factory=Counter)  # return code -> count, for processes not killed
    stderr: list[str] = field(default_factory=list)
    peak_connections: int = 0  # to the Optuna database, from pg_stat_activity
    max_connections: int = 0
    seconds: float = 0.0
    events: list[str] = field(default_factory=list)  # "12.3 s: what happened", for a failing test's output

    def note(self, started: float, what: str) -> None:
        self.events.append(f"{time.monotonic() - started:6.1f} s: {what}")
        print(self.events[-1], file=sys.stderr, flush=True)


class Worker:
    """One `sweep run` process; its stderr goes to a file, read when it ends."""

    def __init__(self, command: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        self.handle = open(log, "wb")  # noqa: SIM115 - closed in finish()
        self.process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=self.handle)
        self.killed = False

    def kill(self) -> None:
        """The machine dies: its process and the --jobs workers it spawned."""
        self.killed = True
        for worker in spawned_workers(self.process.pid):
            with contextlib.suppress(psutil.NoSuchProcess):  # it had just ended
                worker.kill()
        self.process.kill()

    def finish(self) -> str:
        self.process.wait()
        self.handle.close()
        return self.log.read_text(errors="replace")


def connection_counter(pg: Postgres, database: str, log: SoakLog, stop: threading.Event) -> threading.Thread:
    """Samples pg_stat_activity every 0.25 s for the peak number of connections to `database`."""

    def sample() -> None:
        while not stop.is_set():
            try:
                login = {"host": pg.host, "port": pg.port, "user": pg.user, "password": pg.password}
                # autocommit: pg_stat_activity is a snapshot per transaction; each count needs a fresh one
                with psycopg.connect(**login, dbname="postgres", connect_timeout=2, autocommit=True) as connection:
                    log.max_connections = int(connection.execute("SHOW max_connections").fetchone()[0])
                    while not stop.is_set():
                        query = "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND application_name <> %s"
                        count = connection.execute(query, (database, HARNESS)).fetchone()[0]
                        log.peak_connections = max(log.peak_connections, count)
                        time.sleep(0.25)
            except psycopg.Error:  # PostgreSQL restarting: sample again once it is back
                time.sleep(0.5)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    return thread


HARNESS = "soak-harness"  # the application_name of this process's own connections, left out of the peak

FINISHED_QUERY = (
    "SELECT count(*) FROM trials JOIN studies USING (study_id) "
    "WHERE studies.study_name = %s AND trials.state IN ('COMPLETE', 'PRUNED')"
)


def finished_trials(pg: Postgres, database: str) -> int:
    """The study's finished trials, read with one short connection (an Optuna storage per call would
    leave its pool open, and count in the peak)."""
    login = {"host": pg.host, "port": pg.port, "user": pg.user, "password": pg.password}
    try:
        with psycopg.connect(**login, dbname=database, connect_timeout=2, application_name=HARNESS) as connection:
            return connection.execute(FINISHED_QUERY, (STUDY,)).fetchone()[0]
    except psycopg.Error:  # the tables do not exist yet, or PostgreSQL is restarting
        return 0


class Supervisor:
    """Keeps `workers` processes of one command running, as a supervisor would: a worker that was
    killed or exited with an error is replaced; one that exited 0 (the target reached) is not."""

    def __init__(self, command: list[str], env: dict[str, str], root: Path, log: SoakLog, rng: random.Random) -> None:
        self.command, self.env, self.root, self.log, self.rng = command, env, root, log, rng
        self.workers: list[Worker] = []
        self.last_kill = time.monotonic()

    def start(self) -> None:
        self.log.starts += 1
        self.workers.append(Worker(self.command, self.env, self.root / f"worker-{self.log.starts}.log"))

    def supervise(self) -> bool:
        """Replace every worker that ended before the target was reached; False once all are done."""
        for worker in [w for w in self.workers if w.process.poll() is not None]:
            self.workers.remove(worker)
            text = worker.finish()
            if not worker.killed:
                self.log.exits[worker.process.returncode] += 1
                self.log.stderr.append(text)
            if worker.killed or worker.process.returncode != 0:
                self.start()
        return bool(self.workers)

    def wait(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end and self.supervise():
            time.sleep(0.1)

    def kill(self, count: int) -> None:
        # Replace what just ended first (a start-up refused during an outage): there is then a machine
        # to kill, and the test's count of kills holds.
        self.supervise()
        alive = [w for w in self.workers if w.process.poll() is None]
        victims = self.rng.sample(alive, min(count, len(alive)))
        for victim in victims:
            victim.kill()
        self.last_kill = time.monotonic()
        self.log.killed += len(victims)
        self.log.double_kills += len(victims) == 2

    def until_done(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.supervise():
            if time.monotonic() > deadline:
                for worker in self.workers:
                    worker.kill()
                raise AssertionError(f"the soak did not finish in {timeout:.0f} s")
            time.sleep(0.2)


def worker_command(plan: SoakPlan, data_dir: Path, weights: Path, cache: Path) -> list[str]:
    command = [sys.executable, *plan.entry, "run", "--quiet", "--study", STUDY, "--trials", str(plan.trials)]
    command += ["--epochs", str(plan.epochs), "--data-dir", str(data_dir), "--backbone-weights", str(weights)]
    command += ["--config", str(PLAIN), "--cache-dir", str(cache), "--precision", "fp32", "--outage-seconds", "120"]
    return command + ["--jobs", str(plan.jobs)]


WORKER_WAITS = "(lock 'optuna-schema') unreachable"  # a --jobs worker's first call, waiting out an outage


def restart_postgres(pg: Postgres, supervisor: Supervisor, plan: SoakPlan, log: SoakLog) -> str:
    """Restart PostgreSQL; with --jobs, timed into a machine's worker start-ups: the newest machine (a
    replacement for a killed one) sees the database go down just as it spawns its workers, and it
    stays down until each of them has met the outage in its first call (which it must wait out like
    every later one), or the machine stopped."""
    if plan.jobs == 1:
        pg.restart()
        return "PostgreSQL restarted"
    newest = supervisor.workers[-1]

    def spawned() -> bool:
        return newest.process.poll() is not None or bool(spawned_workers(newest.process.pid))

    def workers_wait() -> bool:
        supervisor.supervise()
        text = newest.log.read_text(errors="replace")
        stopped = "Traceback" in text or "Error:" in text or newest.process.poll() is not None
        return text.count(WORKER_WAITS) >= plan.jobs - 1 or stopped

    wait_for(spawned, what="a machine spawning its workers")
    started = time.monotonic()
    with pg.stopped():
        wait_for(workers_wait, what=f"the machine's workers meeting the outage (its stderr: {newest.log})")
    log.workers_started_into_outage = newest.log.read_text(errors="replace").count(WORKER_WAITS)
    return f"PostgreSQL down {time.monotonic() - started:.0f} s as a machine spawned its --jobs workers"


def run_soak(root: Path, pg: Postgres, data_dir: Path, weights: Path, plan: SoakPlan, seed: int = 0) -> SoakLog:
    """Run the soak, then check the record it left (check_record, while the server is still up)."""
    rng = random.Random(seed)
    database = pg.create_database(f"optuna_{plan.workers}_{seed}")
    backend = pg.url(pg.create_database(f"mlflow_{plan.workers}_{seed}"))
    watching = pg.url(database, password=pg.password)  # for this process's own reads
    base_env = {**os.environ, "PGPASSWORD": pg.password}
    port, server_root = free_port(), root / "server"
    log, stop = SoakLog(), threading.Event()

    def tracking_server():
        return mlflow_server(server_root, backend, base_env, ADMIN_PASSWORD, port)

    with ExitStack() as server_up:
        server = server_up.enter_context(tracking_server())
        env = {
            **base_env,
            **server.credentials(),
            "OPTUNA_STORAGE": pg.url(database),  # as users set it: the password comes from PGPASSWORD
            "MLFLOW_TRACKING_URI": server.uri,
            # A killed worker's trial is failed within 20 s (the grace period, 4 beats); a live one outlasts
            # the database's downtime at a worker start-up (up to 15 s seen) without being taken over.
            "SWEEP_HEARTBEAT_SECONDS": "5",
            "OMP_NUM_THREADS": "1",  # many processes on few cores
        }
        command = worker_command(plan, data_dir, weights, root / "cache")
        supervisor, started = Supervisor(command, env, root, log, rng), time.monotonic()

        def progress(what: str) -> None:
            log.note(started, f"{what}; {finished_trials(pg, database)} of {plan.trials} trials finished")

        connection_counter(pg, database, log, stop)
        for _ in range(plan.workers):
            supervisor.start()
        first = lambda: finished_trials(pg, database) >= 1 or not supervisor.supervise()  # noqa: E731
        wait_for(first, timeout=300, what="a first finished trial")
        kills = [2] + [1] * (plan.kills - 2) if plan.kills >= 2 else [1] * plan.kills
        for count in kills[: len(kills) // 2]:
            supervisor.kill(count)
            progress(f"killed {count}")
            supervisor.wait(rng.uniform(1.0, 3.0))
        if plan.pg_restart:
            restarted = restart_postgres(pg, supervisor, plan, log)
            log.pg_restarts += 1
            progress(restarted)
            supervisor.wait(3.0)
        if plan.outage:
            server_up.close()  # the tracking server goes away ...
            log.outages += 1
            progress("tracking server stopped")
            supervisor.wait(plan.outage)
            server = server_up.enter_context(tracking_server())  # ... and comes back on the same port
            progress("tracking server back")
        for count in kills[len(kills) // 2 :]:
            supervisor.kill(count)
            progress(f"killed {count}")
            supervisor.wait(rng.uniform(1.0, 3.0))
        supervisor.until_done(plan.timeout)
        log.seconds = time.monotonic() - started
        progress(f"all workers done: {log.starts} started, exits {dict(log.exits)}")
        stop.set()
        # The sweeper: one last run, once a killed worker's trial is stale, fails what is left RUNNING:
        # 25 s after the last kill is past the grace period (20 s) since its trial's last beat.
        time.sleep(max(0.0, supervisor.last_kill + 25 - time.monotonic()))
        last = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        log.exits[last.returncode] += 1
        log.stderr.append(last.stderr)
        check_record(watching, server.uri, server.credentials(), plan)
        return log


def check_record(storage: str, tracking: str, credentials: dict, plan: SoakPlan) -> None:
    """What the soak must leave: exactly the target, nothing repeated or RUNNING, complete curves and
    checkpoints, every failure explained in both stores, one parent run."""
    study = optuna.load_study(study_name=STUDY, storage=storage)
    trials = study.get_trials(deepcopy=False)
    finished = [t for t in trials if t.state.name in FINISHED]
    assert len(finished) == plan.trials, Counter(t.state.name for t in trials)
    assert not [t for t in trials if t.state.name == "RUNNING"]
    configurations = [tuple(sorted(t.params.items())) for t in finished]
    assert len(set(configurations)) == len(configurations), "a configuration ran twice"
    with mock.patch.dict(os.environ, credentials):  # the client logs in from the environment
        client = MlflowClient(tracking)
        experiment = client.get_experiment_by_name(STUDY)
        runs = client.search_runs([experiment.experiment_id], run_view_type=ViewType.ALL, max_results=5000)
        parents = [r for r in runs if r.data.tags.get("sweep.role") == "study"]
        assert len(parents) == 1
        by_id = {r.info.run_id: r for r in runs}
        trial_of = {t.user_attrs.get("mlflow_run_id"): t for t in trials}
        left_running = [
            f"{r.info.run_name} ({r.data.tags.get('sweep.role')}, Optuna: "
            f"{getattr(trial_of.get(r.info.run_id), 'state', None)})"
            for r in runs
            if r.info.status == "RUNNING"
        ]
        assert not left_running, f"runs left RUNNING: {left_running}"
        for trial in trials:
            run = by_id.get(trial.user_attrs.get("mlflow_run_id"))
            if trial.state.name == "FAIL":
                # Its worker's error in both records, or, failed as stale by another worker, none in
                # Optuna (as Optuna records it) and the stale reason on its run, if it had one.
                run_tags = run.data.tags if run is not None else {}
                details = f"user attrs {trial.user_attrs}, run tags {run_tags}"
                reason = trial.user_attrs.get("error") or run_tags.get("sweep.error")
                assert reason or run is None, f"trial {trial.number} failed without a reason: {details}"
                assert run is None or (run.info.status == "FAILED" and run_tags.get("sweep.error")), details
                continue
            assert run is not None, f"finished trial {trial.number} has no run"
            steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")]
            assert steps == list(range(1, len(steps) + 1)) and steps, (trial.number, steps)
            if trial.state.name == "COMPLETE":
                assert run.info.status == "FINISHED" and len(steps) == plan.epochs, (trial.number, steps)
            only_its = f"source_run_id = '{run.info.run_id}' AND model_type = 'checkpoint'"
            (model,) = client.search_logged_models([run.info.experiment_id], filter_string=only_its)
            assert model.status.name == "READY", (trial.number, model)  # its checkpoint, a logged model


TRIALS_PER_PROCESS, EPOCHS = 4, 2


@click.command()
@click.option("--sizes", default="1,4,8,16", show_default=True, help="Numbers of worker processes, comma-separated.")
def main(sizes: str) -> None:
    """Print the soak table."""
    root = Path(tempfile.mkdtemp(prefix="clothing-bench-soak-"))
    data, weights = root / "data", root / "weights.pth"
    make_split(data / "train", per_class=4)
    make_split(data / "validation", per_class=2, seed=1000)
    torch.save(calibrated_backbone().state_dict(), weights)
    rows, base_rate = [], None
    with postgres_cluster(PG_PASSWORD) as pg:
        for n in (int(s) for s in sizes.split(",")):
            times = root / f"times-{n}"
            times.mkdir()
            os.environ["SOAK_TIMES"] = str(times)
            plan = SoakPlan(
                workers=n, trials=TRIALS_PER_PROCESS * max(n, 2), epochs=EPOCHS, entry=("-m", "bench.soak_worker")
            )
            log = run_soak(root / f"soak-{n}", pg, data, weights, plan, seed=n)
            rate = plan.trials / log.seconds
            base_rate = base_rate or rate
            shares = [json.loads(p.read_text()) for p in times.glob("*.json")]
            wall = sum(s["wall"] for s in shares) or 1.0
            tracking, storage = (100 * sum(s[k] for s in shares) / wall for k in ("tracking", "storage"))
            faults = f"{log.killed} kills ({log.double_kills} double), {log.pg_restarts} restart, {log.outages} outage"
            rows.append(
                (
                    f"{n} process(es), {plan.trials} trials x {EPOCHS} epochs",
                    f"{rate:.3f} trials/s ({rate / base_rate:.2f}x)",
                    f"{log.peak_connections} / {log.max_connections}",
                    f"{tracking:.0f} % / {storage:.0f} %",
                    f"{faults}; {log.starts} starts; exits {dict(log.exits)}; record exact",
                )
            )
            print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    header = ("processes", "trials/s (vs the first row)", "peak connections / max_connections", "tracking / storage")
    print(f"| {' | '.join(header)} | faults |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {' | '.join(row)} |")


if __name__ == "__main__":
    main()
