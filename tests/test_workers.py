"""`--jobs` workers: spawned processes that receive the main process's frozen config as it is."""

import pickle
from pathlib import Path

import pytest

from sweep.config import SweepConfig
from sweep.workers import start_workers


def write_config(cfg: SweepConfig, out: str, threads: int) -> None:
    Path(out).write_bytes(pickle.dumps((cfg, threads)))


@pytest.mark.slow  # a spawned process
def test_a_worker_receives_the_main_process_config_unchanged(tmp_path):
    cfg = SweepConfig(
        data_dir=tmp_path / "data",
        study="s",
        trials=7,
        storage="sqlite:///x.db",
        search=("dropout", "label_smoothing"),
        views=3,
        finetune_blocks=2,
        finetune_lr=1e-5,
        skip_bad_images=True,
        quiet=True,
    )
    out = tmp_path / "seen.pkl"
    (worker,) = start_workers(write_config, (cfg, str(out)), 1)
    worker.join(timeout=120)
    assert worker.exitcode == 0
    seen, threads = pickle.loads(out.read_bytes())
    assert seen == cfg and threads >= 1
