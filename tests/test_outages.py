"""Riding out outages: the retry budget, heartbeat-less trials, and the count when the lock was lost."""

import inspect
import threading
import time
from datetime import datetime, timedelta

import optuna
import psycopg
import pytest
import sqlalchemy
from optuna.exceptions import StorageInternalError
from optuna.trial import TrialState
from sqlalchemy.exc import OperationalError, ProgrammingError
from sweep_helpers import assert_one_error, run_options, sweep

from bench.servers import postgres_cluster
from sweep import storage as storage_module
from sweep.storage import BEATS, CACHE_CALLS, DATABASE_CALLS, LOCAL_CALLS, OutageTolerantStorage
from sweep.stores import (
    MAX_BACKOFF_SECONDS,
    FileLock,
    StoreOutage,
    http_retries_for,
    lost_connection,
    outage_reason,
    retrying,
    storage_error,
    study_lock,
)
from sweep.study import Studies, SurplusTrial, TrialLoop


def flaky(failures: int, error: Exception):
    calls = []

    def call():
        calls.append(time.monotonic())
        if len(calls) <= failures:
            raise error
        return "answer"

    return call, calls


LOST = OperationalError("SELECT 1", {}, Exception("server closed the connection unexpectedly"))


def test_a_lost_connection_is_retried_within_the_budget_and_a_mistake_is_not(capsys):
    call, calls = flaky(2, LOST)
    assert retrying(call, "the store", 30, lambda e: isinstance(e, OperationalError)) == "answer"
    assert len(calls) == 3
    err = capsys.readouterr().err
    assert "the store unreachable (server closed the connection unexpectedly); retrying for up to 30 s" in err
    assert "the store reachable again after" in err

    mistake = ProgrammingError("SELECT nope", {}, Exception("syntax error"))
    call, calls = flaky(1, mistake)
    with pytest.raises(ProgrammingError):
        retrying(call, "the store", 30, lambda e: isinstance(e, OperationalError))
    assert len(calls) == 1


def test_a_lost_connection_under_optunas_wrapping_is_still_a_lost_connection():
    """RDBStorage re-raises every SQLAlchemy error of a session as StorageInternalError ("invalid data
    in the commit"); a refused connect under it is still an outage to wait out, a bad query still not."""
    wrapped = StorageInternalError("An exception is raised during the commit.")
    wrapped.__cause__ = LOST
    assert lost_connection(wrapped)
    assert outage_reason(wrapped) == "server closed the connection unexpectedly"
    mistake = StorageInternalError("An exception is raised during the commit.")
    mistake.__cause__ = ProgrammingError("SELECT nope", {}, Exception("syntax error"))
    assert not lost_connection(mistake)
    # At start-up nothing is waited out; the one line names the driver's reason, not Optuna's wrapper.
    message = str(storage_error("postgresql://sweep:pw-Secret@db/optuna", wrapped))
    assert message.startswith("cannot open the Optuna storage postgresql://sweep:***@db/optuna: server closed")
    assert "invalid data" not in message and "pw-Secret" not in message


@pytest.mark.slow  # a PostgreSQL cluster of its own
def test_a_heartbeat_waits_out_a_stopped_database_instead_of_dying(tmp_path):
    """Optuna's heartbeat thread dies on the first error it sees; with the database down for a moment,
    the trial of a live worker would then look stale and be failed by another worker."""
    password = "outage-Secret-5"
    with postgres_cluster(password) as pg:
        storage = OutageTolerantStorage(
            pg.url(pg.create_database("optuna"), password=password), heartbeat_interval=1, grace_period=60
        )
        storage.ride_out_outages(60)
        trial_id = optuna.create_study(study_name="s", storage=storage).ask()._trial_id
        beats: list = []
        with pg.stopped():
            beating = threading.Thread(target=lambda: beats.append(storage.record_heartbeat(trial_id)))
            beating.start()
            time.sleep(2)
            assert beating.is_alive()  # waiting for the database, not dead of its first refused connect
        beating.join(60)
        assert not beating.is_alive() and beats == [None]  # the beat landed once the database was back
        assert storage.get_trial(trial_id).state == TrialState.RUNNING


@pytest.mark.slow  # a PostgreSQL cluster of its own
def test_right_after_an_outage_no_trial_is_judged_stale_until_live_beats_can_land(tmp_path):
    """A database down for longer than the grace period stops every worker's heartbeats; a worker
    whose first stale check came right after would fail the trials of live workers whose next beat
    is still waiting out its retry's backoff (seen in test_cluster: a live trial taken over)."""
    password = "outage-Secret-7"
    with postgres_cluster(password) as pg:
        storage = OutageTolerantStorage(
            pg.url(pg.create_database("optuna"), password=password), heartbeat_interval=1, grace_period=2
        )
        storage.ride_out_outages(60)
        study = optuna.create_study(study_name="s", storage=storage)
        trial_id = study.ask()._trial_id
        storage.record_heartbeat(trial_id)  # its worker beat once, and then (as it turns out) died
        with pg.stopped():
            reading = threading.Thread(target=lambda: storage.get_all_trials(study._study_id))
            reading.start()  # this worker meets the outage, and waits it out
            time.sleep(storage.grace_period + 1)
        reading.join(60)
        optuna.storages.fail_stale_trials(study)  # the beat is older than the grace period, but ...
        assert storage.get_trial(trial_id).state == TrialState.RUNNING  # ... the database just came back
        time.sleep(MAX_BACKOFF_SECONDS + storage.grace_period)  # every live worker has beaten by now
        optuna.storages.fail_stale_trials(study)
        assert storage.get_trial(trial_id).state == TrialState.FAIL


@pytest.mark.slow  # a PostgreSQL cluster of its own
def test_a_connection_dropped_while_optuna_reads_trials_is_waited_out(tmp_path, capsys):
    """Optuna's trial read answers an OperationalError by trying a slower query on the same session,
    which then fails with PendingRollbackError: under it is still the lost connection (seen in the
    soak as a worker stopping with a traceback when PostgreSQL went down mid-read)."""
    password = "outage-Secret-6"
    with postgres_cluster(password) as pg:
        storage = OutageTolerantStorage(pg.url(pg.create_database("optuna"), password=password))
        storage.ride_out_outages(30)
        study = optuna.create_study(study_name="s", storage=storage)
        study.enqueue_trial({"x": 1.0})  # a trial with system attributes: the read that loads them
        dropped = []

        def drop_the_connection(connection, cursor, statement, *args) -> None:
            if "FROM trial_system_attributes" in statement and not dropped:
                backend = connection.connection.dbapi_connection.info.backend_pid
                login = {"host": pg.host, "port": pg.port, "user": pg.user, "password": password}
                with psycopg.connect(**login, dbname="postgres", autocommit=True) as admin:
                    dropped.extend(admin.execute("SELECT pg_terminate_backend(%s, 5000)", (backend,)).fetchall())

        sqlalchemy.event.listen(storage.engine, "before_cursor_execute", drop_the_connection)
        trials = storage.get_all_trials(study._study_id)
    assert dropped == [(True,)]  # the read really lost its connection ...
    assert [t.system_attrs["fixed_params"] for t in trials] == [{"x": 1.0}]  # ... and was retried
    err = capsys.readouterr().err
    assert "unreachable (terminating connection due to administrator command)" in err
    assert "reachable again" in err


def test_an_outage_longer_than_the_budget_fails_naming_the_store_and_a_zero_budget_fails_at_once():
    call, calls = flaky(1000, LOST)
    start = time.monotonic()
    with pytest.raises(StoreOutage, match=r"the store stayed unreachable for 2 s \(--outage-seconds\)"):
        retrying(call, "the store", 2, lambda e: True)
    assert 1.0 <= time.monotonic() - start <= 4 and len(calls) >= 2
    call, calls = flaky(1000, LOST)
    with pytest.raises(OperationalError):
        retrying(call, "the store", 0, lambda e: True)
    assert len(calls) == 1


def test_mlflow_http_retries_cover_the_budget():
    for budget in (10, 30, 120, 600):
        retries = http_retries_for(budget)
        waits = [2 * 2**i for i in range(retries)]  # MLflow's backoff, factor 2
        assert sum(waits) >= budget > sum(waits[:-1])
    assert http_retries_for(0) == 0


def sqlite_storage(tmp_path, grace=2) -> OutageTolerantStorage:
    return OutageTolerantStorage(f"sqlite:///{tmp_path / 'optuna.db'}", heartbeat_interval=1, grace_period=grace)


def test_only_the_sweeps_own_trials_are_failed_for_never_beating_and_by_the_databases_clock(tmp_path):
    """A worker killed between creating its trial and its first heartbeat leaves a RUNNING trial that
    Optuna's own stale check skips forever; a trial another client made with `study.ask()` (no
    heartbeats, by Optuna's contract) must stay RUNNING all the same."""
    storage = sqlite_storage(tmp_path)
    storage.marks_trials = True  # as sweep.study.make_storage sets it
    study = optuna.create_study(study_name="s", storage=storage)
    orphan = study.ask()  # the sweep's trial: created, never beaten for, owner gone
    notebook = optuna.load_study(study_name="s", storage=optuna.storages.RDBStorage(storage.url)).ask()
    with storage.engine.begin() as connection:  # this machine's clock says it started an hour ago
        connection.exec_driver_sql(
            "UPDATE trials SET datetime_start = ? WHERE trial_id = ?",
            (datetime.now() - timedelta(hours=1), orphan._trial_id),
        )

    def states() -> dict:
        return {t.number: (t.state, t.user_attrs) for t in study.get_trials()}

    optuna.storages.fail_stale_trials(study)  # first seen: the database's clock starts now
    assert states() == {0: (TrialState.RUNNING, {}), 1: (TrialState.RUNNING, {})}
    time.sleep(storage.grace_period + 1)
    optuna.storages.fail_stale_trials(study)
    # Optuna records no reason on the trial (a retry callback would copy it onto the retried trial);
    # the MLflow run and the terminal say why (sweep.pipeline).
    assert states() == {0: (TrialState.FAIL, {}), 1: (TrialState.RUNNING, {})}
    assert notebook.number == 1 and BEATS not in study.get_trials()[1].system_attrs


def test_a_trial_created_without_the_lock_steps_aside_when_others_reached_the_target(tmp_path):
    storage = sqlite_storage(tmp_path, grace=60)
    study = optuna.create_study(study_name="s", storage=storage)
    for _ in range(2):
        study.tell(study.ask(), 1.0)
    other = study.ask()  # another worker's trial, RUNNING: it counts toward the target
    mine = study.ask()
    lock = FileLock(tmp_path / "lock")
    loop = TrialLoop(Studies(storage, study), study, objective=None, target=3, lock=lock)
    with pytest.raises(SurplusTrial, match="3 other trials already finish or run toward the target of 3"):
        loop.refuse_surplus(mine.number)
    study.tell(other, state=TrialState.FAIL)  # that worker died: the target needs this trial after all
    loop.refuse_surplus(mine.number)
    assert not lock.held()  # taken for the count only


def test_every_reach_into_optuna_is_still_there_and_every_database_call_is_retried():
    """sweep.storage is the one module that relies on Optuna's internals; this fails when an Optuna
    upgrade changes one of them (the behaviour they give is tested above, in test_study and by
    Optuna's own storage tests in test_optuna_storage)."""
    rdb, cache = optuna.storages.RDBStorage, optuna.storages._CachedStorage  # noqa: SLF001
    public = {name for name in dir(rdb) if not name.startswith("_") and callable(getattr(rdb, name))}
    assert public == set(DATABASE_CALLS) | set(LOCAL_CALLS), "a call of RDBStorage is neither retried nor named"
    retried = (*DATABASE_CALLS, *CACHE_CALLS, "_create_new_trial", "_get_stale_trial_ids")
    assert all(getattr(OutageTolerantStorage, name) is not getattr(rdb, name) for name in retried)
    # The private calls the cache makes on its backend are the ones retried, and nothing else.
    called = set()
    for method in vars(cache).values():
        names = getattr(getattr(method, "__code__", None), "co_names", ())
        called |= {name for name in names if name.startswith("_") and callable(getattr(rdb, name, None))}
    called -= {name for name in called if name.startswith("__")}
    assert called == {*CACHE_CALLS, "_create_new_trial", "_get_stale_trial_ids"}
    assert list(inspect.signature(rdb._create_new_trial).parameters) == ["self", "study_id", "template_trial"]  # noqa: SLF001
    # The stale check fail_stale_trials runs, which OutageTolerantStorage extends, and the models it queries.
    assert "_get_stale_trial_ids" in optuna.storages.fail_stale_trials.__wrapped__.__code__.co_names
    models = storage_module.models
    assert {"trial_id", "study_id", "state", "heartbeats"} <= set(vars(models.TrialModel))
    assert {"trial_id", "key"} <= set(vars(models.TrialSystemAttributeModel))


@pytest.mark.slow  # a PostgreSQL cluster of its own
def test_the_study_lock_knows_when_a_restart_took_it(tmp_path):
    password = "outage-Secret-3"
    with postgres_cluster(password) as pg:
        url = pg.url(pg.create_database("optuna"), password=password)
        lock = study_lock(url, "s")
        lock.acquire()
        assert lock.held()
        with psycopg.connect(
            host=pg.host, port=pg.port, user=pg.user, password=password, dbname="postgres", autocommit=True
        ) as admin:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory'")
        assert not lock.held()  # the server dropped it with its connection
        other = study_lock(url, "s")
        other.acquire()  # and another worker can take it
        assert other.held()
        other.release()
        lock.release()  # on a dead connection: a no-op, no error
        pg.restart()
        lock = study_lock(url, "s", outage_seconds=30)
        lock.acquire()  # after a restart, on a fresh connection
        assert lock.held()
        lock.release()


@pytest.mark.slow  # a PostgreSQL cluster of its own
def test_a_database_out_of_connections_is_one_error_naming_max_connections(tmp_path, data_dir, tiny_weights):
    password = "outage-Secret-4"
    with postgres_cluster(password, "-c max_connections=3 -c superuser_reserved_connections=0") as pg:
        url = pg.url(pg.create_database("optuna"), password=password)
        login = {"host": pg.host, "port": pg.port, "user": pg.user, "password": password, "dbname": "postgres"}
        held = [psycopg.connect(**login) for _ in range(3)]  # every slot taken by other clients
        try:
            stores = {"--storage": url, "--tracking-uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}
            result = sweep("run", *run_options(data_dir, tiny_weights, 1, 1), stores=stores)
        finally:
            for connection in held:
                connection.close()
    assert_one_error(result, "max_connections", "run fewer processes or raise max_connections")
    assert password not in result.output
