"""Throwaway PostgreSQL clusters and MLflow tracking servers, started and stopped by the tests and the
benchmarks (bench.cluster, bench.soak).

They are real: PostgreSQL 15 from the machine's binaries (password authentication, scram-sha-256),
and `mlflow server` with the basic-auth app, a PostgreSQL backend store and artifact serving, so
checkpoints and plots travel over HTTP as they do on a team's server.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil
import requests

ADMIN_USER = "admin"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition, timeout=120, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


class PostgresMissing(RuntimeError):
    """No PostgreSQL binaries here (the tests skip on it, or fail where CI sets SWEEP_REQUIRE_POSTGRES)."""


def spawned_workers(pid: int) -> list[psutil.Process]:
    """The `--jobs` workers process `pid` has spawned so far (not any other child, such as a `uname`
    a library runs while it starts); none once `pid` has ended."""
    try:
        children = psutil.Process(pid).children()
    except psutil.NoSuchProcess:
        return []
    workers = []
    for child in children:
        try:
            if "spawn_main" in " ".join(child.cmdline()):
                workers.append(child)
        except psutil.NoSuchProcess:
            pass  # it ended between the listing and the look (a short-lived `uname`)
    return workers


def postgres_bin() -> Path:
    """The folder of initdb and pg_ctl."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb")) or [shutil.which("initdb") or ""]
    if found[-1]:
        return Path(found[-1]).parent
    raise PostgresMissing(
        "PostgreSQL binaries (initdb, pg_ctl) not found; install them (Debian: apt-get install postgresql)"
    )


@dataclass(frozen=True)
class Postgres:
    host: str
    port: int
    user: str
    password: str
    bin_dir: Path
    pg_ctl: tuple[str, ...] = ()  # pg_ctl -D DATA -l LOG, run as the postgres user where we are root

    options: str = ""  # the server options it was started with

    def restart(self) -> None:
        """`pg_ctl restart -m fast`: every connection is dropped (a failover, a maintenance window)."""
        self._pg_ctl("-m", "fast", "-w", "restart")

    @contextmanager
    def stopped(self) -> Iterator[None]:
        """The server down while the block runs (connections refused), then started again as it was."""
        self._pg_ctl("-m", "fast", "-w", "stop")
        try:
            yield
        finally:
            self._pg_ctl("-o", self.options, "-w", "start")

    def _pg_ctl(self, *args: str) -> None:
        command = [*self.pg_ctl, *args]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)

    def dump(self, database: str) -> str:
        """Everything in `database`, as SQL (pg_dump)."""
        command = [str(self.bin_dir / "pg_dump"), "-h", self.host, "-p", str(self.port), "-U", self.user, database]
        env = {**os.environ, "PGPASSWORD": self.password}
        return subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout

    def url(self, database: str, *, password: str | None = None) -> str:
        """A SQLAlchemy URL (psycopg 3); without `password` the client takes it from PGPASSWORD."""
        login = f"{self.user}:{password}" if password else self.user
        return f"postgresql://{login}@{self.host}:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        import psycopg  # the `postgres` extra, which `make test` installs

        with psycopg.connect(
            host=self.host, port=self.port, user=self.user, password=self.password, dbname="postgres", autocommit=True
        ) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return name


@contextmanager
def postgres_cluster(password: str, settings: str = "") -> Iterator[Postgres]:
    """A new cluster on a free port, with password (scram-sha-256) authentication and `settings`
    (server options, e.g. "-c max_connections=4"); removed afterwards."""
    bin_dir = postgres_bin()
    root = Path(tempfile.mkdtemp(prefix="sweep-pg-"))
    as_postgres: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        os.chmod(root, 0o777)
        as_postgres = ["runuser", "-u", "postgres", "--"]
    (root / "pwfile").write_text(password + "\n")
    os.chmod(root / "pwfile", 0o644)
    data, port = root / "data", free_port()
    pg_ctl = [*as_postgres, str(bin_dir / "pg_ctl"), "-D", str(data)]
    subprocess.run(
        [*as_postgres, str(bin_dir / "initdb"), "-D", str(data), "-U", "sweep", "--auth=scram-sha-256"]
        + ["--pwfile", str(root / "pwfile")],
        check=True,
        capture_output=True,
    )
    options = f"-h 127.0.0.1 -p {port} -k {data} {settings}".strip()
    subprocess.run([*pg_ctl, "-o", options, "-l", str(root / "log"), "-w", "start"], check=True, capture_output=True)
    try:
        yield Postgres("127.0.0.1", port, "sweep", password, bin_dir, (*pg_ctl, "-l", str(root / "log")), options)
    finally:
        subprocess.run([*pg_ctl, "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@dataclass(frozen=True)
class MlflowServer:
    uri: str
    admin_password: str | None
    artifacts: Path

    def credentials(self, password: str | None = None) -> dict[str, str]:
        """The environment that logs a client in (as admin, or with a wrong `password`)."""
        return {"MLFLOW_TRACKING_USERNAME": ADMIN_USER, "MLFLOW_TRACKING_PASSWORD": password or self.admin_password}


@contextmanager
def mlflow_server(
    root: Path,
    backend_uri: str,
    env: dict[str, str] | None = None,
    admin_password: str | None = None,
    port: int | None = None,
) -> Iterator[MlflowServer]:
    """`mlflow server` on `port` (default: a free one): `backend_uri` holds the runs, artifacts are
    served from a folder of their own. With `admin_password`, the basic-auth app guards it. Waits for
    /health before handing out the URL. The same arguments again start it again, after an outage."""
    root.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    # The sweep needs none of the server's background jobs (GenAI evaluation, trace roll-ups); off, they
    # leave the 2 CPU cores to the workers instead of four idle consumer processes.
    server_env = {**(env or os.environ), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    command = [os.path.join(os.path.dirname(sys.executable), "mlflow"), "server"]
    if admin_password is not None:
        config = root / "basic_auth.ini"
        config.write_text(
            "[mlflow]\n"
            "default_permission = READ\n"
            f"database_uri = sqlite:///{root / 'auth.db'}\n"
            f"admin_username = {ADMIN_USER}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
            # Without the cache every request re-hashes the password (PBKDF2, ~0.3 s on this CPU).
            "auth_cache_ttl_seconds = 300\n"
        )
        server_env.update(
            MLFLOW_AUTH_CONFIG_PATH=str(config),
            MLFLOW_AUTH_ADMIN_PASSWORD=admin_password,
            MLFLOW_FLASK_SERVER_SECRET_KEY=os.urandom(16).hex(),
        )
        command += ["--app-name", "basic-auth"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    command += ["--backend-store-uri", backend_uri, "--artifacts-destination", str(root / "artifacts")]
    uri = f"http://127.0.0.1:{port}"
    with serving(command, server_env, root / "server.log", f"{uri}/health", "mlflow server"):
        yield MlflowServer(uri, admin_password, root / "artifacts")


@contextmanager
def model_server(root: Path, model_uri: str, tracking_uri: str) -> Iterator[str]:
    """`mlflow models serve -m MODEL_URI --env-manager local` on a free loopback port, as a user runs
    it: the venv's bin on PATH (it execs uvicorn), pickle deserialisation switched off. Yields the
    /invocations URL once /ping answers."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    bin_dir = os.path.dirname(sys.executable)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "MLFLOW_TRACKING_URI": tracking_uri,
        "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false",
    }
    command = [os.path.join(bin_dir, "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    url = f"http://127.0.0.1:{port}"
    with serving(command, env, root / f"serve-{port}.log", f"{url}/ping", "mlflow models serve"):
        yield f"{url}/invocations"


@contextmanager
def serving(command: list[str], env: dict[str, str], log_path: Path, probe_url: str, what: str) -> Iterator[None]:
    """Run a server `command` until the block ends; enter the block once GET `probe_url` answers 200.
    A server that exits before that fails the test with the end of its log."""
    log = open(log_path, "ab")  # noqa: SIM115 - closed below; appended to when a server starts again
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)

    def up() -> bool:
        if server.poll() is not None:
            raise AssertionError(f"{what} exited:\n{log_path.read_text()[-3000:]}")
        try:
            return requests.get(probe_url, timeout=2).status_code == 200
        except requests.RequestException:
            return False

    try:
        wait_for(up, timeout=180, what=f"{what} at {probe_url}")
        yield
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
