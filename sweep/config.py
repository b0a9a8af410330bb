"""Configuration as frozen dataclasses, built once at the CLI and passed down.

`SweepConfig` is also the one table of `run`'s settings: every field made by `setting()` declares its
type with its bounds, default and help once, and the click options, the sweep-file check and the
parent run's params are made from it (`sweep.settings`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import click

from clothing.data import IMAGE_SIZE, shown
from clothing.engines import ENGINES
from clothing.extract import PRECISIONS
from clothing.model import MAX_FINETUNE_BLOCKS, TORCHVISION_WEIGHTS
from sweep.outages import DEFAULT_OUTAGE_SECONDS
from sweep.select import DEFAULT_TOLERANCE
from sweep.settings import FiniteFloat, Jobs, setting, settings_of
from sweep.stores import STORAGE_ENV

RUNS_DIR = Path("mlruns")  # every piece of run state lives here: stores, artifacts, feature cache

# Bounds of the settings and of the search spaces (sweep.space).
MAX_EPOCHS = 1000
MAX_VIEWS = 16
IMAGE_SIZES = (32, 1024)  # the smallest side MobileNetV2's five stride-2 stages leave a pixel of
MAX_FINETUNE_TRIALS = 100
MAX_FINETUNE_SOURCES = 10
FINETUNE_LR_RANGE = (1e-7, 1e-2)  # what a stage-2 lr may be
FINETUNE_SEARCH_LR = (1e-5, 3e-4)  # a stage-2 search's lr range (docs/benchmarks.md, "Accuracy")
MAX_LABEL_SMOOTHING = 0.5
OPTIONAL_DIMENSIONS = ("dropout", "weight_decay", "label_smoothing")  # `run --search NAME`
AVERAGES = ("none", "ema")
TRAINING_PRECISIONS = ("fp32", "bf16")  # what a stage-2 trial trains in (its `train_precision` param)
SCHEDULES = ("constant", "cosine")
# About two epochs' worth of steps at the default batch size on the clothing data (87 steps an epoch).
EMA_DECAY = 0.995


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
    """Everything `python -m sweep run` was asked to do; each field is one of its options."""

    # Where the data, the stores and the cache are.
    data_dir: Path = setting(
        Path("data/clothing-dataset-small"),
        click.Path(path_type=Path),
        "Folder of image folders: train/ and validation/ (one sub-folder per class), optionally test/ "
        "(env CLOTHING_DATA_DIR).",
        envvar="CLOTHING_DATA_DIR",
    )
    study: str = setting("clothing", click.STRING, "Optuna study name = MLflow experiment name.")
    storage: str = setting(
        default_storage,
        click.STRING,
        "Optuna storage URL (SQLite, PostgreSQL, MySQL, ...); keep a PostgreSQL password in PGPASSWORD or "
        "~/.pgpass, not in the URL.",
        envvar=STORAGE_ENV,
        secret=True,
        show_default=f"${STORAGE_ENV}, else sqlite:///<abs>/mlruns/optuna.db",
    )
    tracking_uri: str = setting(
        default_tracking_uri,
        click.STRING,
        "MLflow tracking store or server; a server's login comes from MLFLOW_TRACKING_USERNAME and "
        "MLFLOW_TRACKING_PASSWORD.",
        envvar="MLFLOW_TRACKING_URI",
        secret=True,
        show_default="$MLFLOW_TRACKING_URI, else sqlite:///<abs>/mlruns/mlflow.db",
    )
    outage_seconds: int = setting(
        DEFAULT_OUTAGE_SECONDS,
        click.IntRange(0, 24 * 3600),
        "How long a worker that has reached its stores waits out a lost database connection or an "
        "unreachable tracking server (retrying with backoff) before the trial fails; 0: fail at once. "
        "At start-up an unreachable store is an error at once.",
    )
    backbone_weights: str | None = setting(
        TORCHVISION_WEIGHTS,
        click.STRING,
        "Local MobileNetV2 state_dict, or IMAGENET1K_V1 to download torchvision's (env CLOTHING_BACKBONE_WEIGHTS).",
        envvar="CLOTHING_BACKBONE_WEIGHTS",
    )
    cache_dir: Path = setting(
        default_cache_dir,
        click.Path(path_type=Path),
        "Where cached features live (env CLOTHING_CACHE_DIR).",
        envvar="CLOTHING_CACHE_DIR",
        show_default="mlruns/cache",
    )
    device: str = setting(
        "auto", click.Choice(["auto", "cpu", "cuda"]), "Where to run; auto picks CUDA when available."
    )
    # Stage 1.
    trials: int = setting(
        20,
        click.IntRange(1, 1_000_000),
        "Target number of finished (COMPLETE or PRUNED) trials; a re-run only adds what is missing.",
        in_file=True,
    )
    epochs: int = setting(10, click.IntRange(1, MAX_EPOCHS), "Epochs per trial.", in_file=True)
    seed: int = setting(
        42,
        click.IntRange(0, 2**32 - 1),
        "Sampler and training seed; each trial's draws are seeded from it and the trial's number.",
        in_file=True,
    )
    batch_size: int = setting(32, click.IntRange(1, 65_536), "Training batch size.", in_file=True)
    pruner: str = setting(
        "median",
        click.Choice(["median", "none"]),
        "Optuna MedianPruner on per-epoch val accuracy, or none.",
        in_file=True,
    )
    precision: str = setting(
        "auto",
        click.Choice(PRECISIONS),
        "Feature extraction: exact (eager torch fp32, the reference), fp32, bf16; auto picks the fastest the "
        "hardware runs natively. All stay within cosine 0.99 of exact.",
        in_file=True,
    )
    engine: str = setting(
        "auto",
        click.Choice(ENGINES),
        "What runs the frozen backbone over the images: openvino (the fast CPU runtime) or torch (the "
        "reference, and the only one on a GPU or with --precision exact); auto picks openvino where it applies.",
        in_file=True,
    )
    skip_bad_images: bool = setting(
        False,
        bool,
        "Leave unreadable images out (listed on the parent run) instead of stopping.",
        flag="--skip-bad-images",
    )
    search: tuple[str, ...] = setting(
        (),
        click.Choice(OPTIONAL_DIMENSIONS),
        "Also search this dimension (repeatable): dropout {0, 0.2, 0.5}, weight_decay [1e-6, 1e-2] log, "
        "label_smoothing {0, 0.1, 0.2}. Off, each keeps 0.",
        multiple=True,
    )
    # space.Dimension's from a sweep file (its `space`): over the defaults, and searched.
    space: tuple = ()
    jobs: int = setting(
        1,
        Jobs(),
        "Worker processes on this machine sharing the study's stage-1 trials, each with an equal share of the "
        "cores (features are extracted once first); auto: one per core.",
    )
    views: int = setting(
        1,
        click.IntRange(1, MAX_VIEWS),
        "Cached views per training image: 1 the plain image, 2 adds its mirror, more add the course's random "
        "rotation/crop/flip; each epoch draws one view per image. Each view costs one backbone pass.",
        in_file=True,
    )
    image_size: int = setting(
        IMAGE_SIZE,
        click.IntRange(*IMAGE_SIZES),
        "Side of the square every image is resized to for the backbone (features, stage 2, the exported "
        "model and predict); larger sees more detail at (size/224)^2 the backbone's work.",
        in_file=True,
    )
    tolerance: float = setting(
        DEFAULT_TOLERANCE,
        FiniteFloat(0, 1),
        "Winner rule: trials within this much of the best val_acc compete on the smallest gap.",
        in_file=True,
    )
    # Stage 2.
    finetune_blocks: int = setting(
        0,
        click.IntRange(0, MAX_FINETUNE_BLOCKS),
        "Stage 2: then fine-tune the winner's last K inverted-residual blocks (and the final 1x1 conv) on "
        "activations cached at the cut, as trials tagged stage=finetune (see --finetune-trials); 0 = off.",
        in_file=True,
    )
    finetune_epochs: int = setting(10, click.IntRange(1, MAX_EPOCHS), "Epochs of stage 2.", in_file=True)
    finetune_lr: float = setting(
        3e-5,
        FiniteFloat(*FINETUNE_LR_RANGE),
        "Learning rate of stage 2 (blocks and head): small, so the pretrained blocks are adjusted, not overwritten.",
        in_file=True,
    )
    finetune_lr_decay: float = setting(
        1.0,
        FiniteFloat(0, 1, min_open=True),
        "Stage 2's layer-wise lr decay: the head and the final 1x1 conv train at --finetune-lr, each block "
        "below at this factor times the one above it (timm's layer_decay, fastai's discriminative lr); 1: one lr.",
        in_file=True,
    )
    finetune_trials: int = setting(
        1,
        click.IntRange(1, MAX_FINETUNE_TRIALS),
        "Stage-2 trials: 1 runs the fixed recipe (--finetune-blocks, --finetune-lr); more search the block "
        "count in [1, --finetune-blocks] (cycled, deepest first) and the lr in [{:g}, {:g}] (log), with "
        "pruning.".format(*FINETUNE_SEARCH_LR),
        in_file=True,
    )
    finetune_sources: int = setting(
        1,
        click.IntRange(1, MAX_FINETUNE_SOURCES),
        "Stage 2 starts from this many stage-1 trials, each fine-tuned with --finetune-trials trials: the "
        "rule's winner, then the next COMPLETE trials by val_acc. The rule then ranks every trial of both stages.",
        in_file=True,
    )
    finetune_average: str = setting(
        "none",
        click.Choice(AVERAGES),
        f"Stage 2: ema validates and keeps an exponential moving average of the weights (decay {EMA_DECAY:g} a step).",
        in_file=True,
    )
    finetune_schedule: str = setting(
        "constant",
        click.Choice(SCHEDULES),
        "Stage 2's lr: constant, or cosine (annealed to 0 over the trial's steps).",
        in_file=True,
    )
    finetune_precision: str = setting(
        "auto",
        click.Choice(("auto", *TRAINING_PRECISIONS)),
        "Stage 2's training: bf16 (autocast, fp32 master weights) or fp32; auto trains in bf16 where "
        "--precision auto or bf16 resolves to bf16 on hardware that runs it natively, else fp32.",
        in_file=True,
    )
    finetune_patience: int = setting(
        0,
        click.IntRange(0, MAX_EPOCHS),
        "Stage 2 stops after this many epochs in a row without a better val_acc (the checkpoint is the "
        "best epoch's); 0: all --finetune-epochs.",
        in_file=True,
    )
    finetune_label_smoothing: float = setting(
        0.0,
        FiniteFloat(0, MAX_LABEL_SMOOTHING),
        "Stage 2's label smoothing (stage 1's is searched with --search label_smoothing).",
        in_file=True,
    )
    refit: bool = setting(
        False,
        click.BOOL,
        "After the rule has chosen, train the winner's configuration again on train + validation for its best "
        "epoch count (a run of its own, <trial>-refit); `best --export` then writes that model out.",
        flag="--refit/--no-refit",
        in_file=True,
    )
    # The held-out estimate (sweep.holdout) and what the run shows.
    holdout: float = setting(
        0.0,
        FiniteFloat(0, 0.5, max_open=True),
        "Leave this fraction of train/ (stratified) out of every trial, for an estimate no trial or rule saw "
        "(make bench-accuracy); 0 = none.",
    )
    holdout_seed: int = setting(0, click.IntRange(0, 2**32 - 1), "Which images --holdout leaves out.")
    system_metrics: bool = setting(
        True,
        bool,
        "Log MLflow's system metrics (CPU, memory, disk, network, GPU) on the parent run while trials run.",
        flag="--system-metrics/--no-system-metrics",
    )
    quiet: bool = setting(False, bool, "No progress output.", flag="--quiet", show_default=False)

    @property
    def progress(self) -> bool:
        return not self.quiet


def parent_params(cfg: SweepConfig) -> dict[str, str]:
    """The sweep's settings as the parent run's params: every setting but the secret ones (a store URL
    may hold a password), in words a user reads."""

    def shown_value(value) -> str:
        if isinstance(value, Path):
            return shown(value)
        if isinstance(value, tuple):
            return ",".join(value) or "-"
        return str(value)

    return {
        name: shown_value(getattr(cfg, name)) for name, (_, how) in settings_of(SweepConfig).items() if not how.secret
    }


@dataclass(frozen=True)
class FinetuneConfig:
    """What one stage-2 trial trains with: the source trial's head, its last `blocks` blocks unfrozen,
    and `train` (the source's head configuration with stage 2's own lr, epochs and label smoothing),
    with `average` ("none" or "ema"), `schedule` ("constant" or "cosine"), `train_precision` (one of
    TRAINING_PRECISIONS), `patience` (EarlyStopping's; 0: off) and `lr_decay` (layer-wise; 1: off)."""

    source_trial: int
    blocks: int
    train: TrainConfig
    average: str = "none"
    schedule: str = "constant"
    train_precision: str = "fp32"
    patience: int = 0
    lr_decay: float = 1.0
