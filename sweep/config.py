"""Configuration as frozen dataclasses, built once at the CLI and passed down."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

RUNS_DIR = Path("mlruns")  # every piece of run state lives here: stores, artifacts, feature cache


def default_storage() -> str:
    return f"sqlite:///{(RUNS_DIR / 'optuna.db').resolve()}"


def default_tracking_uri() -> str:
    return f"sqlite:///{(RUNS_DIR / 'mlflow.db').resolve()}"


def default_cache_dir() -> Path:
    return RUNS_DIR / "cache"


@dataclass(frozen=True)
class TrainConfig:
    """What one trial trains with: the sampled hyperparameters plus the fixed settings."""

    lr: float
    size_inner: int
    dropout: float = 0.0
    weight_decay: float = 0.0
    label_smoothing: float = 0.0
    epochs: int = 10
    batch_size: int = 32
    seed: int = 42


@dataclass(frozen=True)
class SweepConfig:
    """Everything `python -m sweep run` was asked to do."""

    data_dir: Path
    study: str = "clothing"
    trials: int = 20
    epochs: int = 10
    storage: str = ""
    tracking_uri: str = ""
    backbone_weights: str | None = None
    seed: int = 42
    batch_size: int = 32
    device: str = "auto"
    pruner: str = "median"
    cache_dir: Path = RUNS_DIR / "cache"
    precision: str = "auto"
    engine: str = "auto"  # what runs the trunk over the images (clothing.engines)
    skip_bad_images: bool = False
    search: tuple[str, ...] = ()  # opt-in search dimensions beyond lr and size_inner, default grids
    space: tuple = ()  # space.Dimension's from a sweep file: over the defaults, and searched
    tolerance: float = 0.02  # the winner rule's band (select.DEFAULT_TOLERANCE)
    views: int = 1  # cached views per training image (1: the plain image, no augmentation)
    finetune_blocks: int = 0  # stage 2: fine-tune the winner's last K inverted-residual blocks (0: off)
    finetune_epochs: int = 10
    finetune_lr: float = 3e-5
    finetune_trials: int = 1  # 1: the fixed recipe above; more: search blocks in [1, finetune_blocks] and lr
    finetune_average: str = "none"  # "ema": evaluate and keep an exponential moving average of the weights
    finetune_schedule: str = "constant"  # "cosine": anneal the lr to 0 over stage 2's steps
    finetune_label_smoothing: float = 0.0
    holdout: float = 0.0  # leave this fraction of train/ out of the sweep (sweep.holdout); 0: none
    holdout_seed: int = 0
    system_metrics: bool = True  # MLflow's CPU/memory/GPU metrics on the parent run
    progress: bool = True


@dataclass(frozen=True)
class FinetuneConfig:
    """What one stage-2 trial trains with: the source trial's head, its last `blocks` blocks unfrozen,
    and `train` (the source's head configuration with stage 2's own lr, epochs and label smoothing),
    with `average` ("none" or "ema") and `schedule` ("constant" or "cosine")."""

    source_trial: int
    blocks: int
    train: TrainConfig
    average: str = "none"
    schedule: str = "constant"
