"""The one table of `run`'s settings, in four sections (stores, data, stage 1, stage 2), and sweep files.

Every default is the recommended recipe (docs/benchmarks.md): `python -m sweep run` and `make sweep`
run the same sweep. A sweep file (`--config`) holds what differs from the defaults and stage 1's
search space (`sweeps/plain.yaml`: the mission's head-only sweep); its settings become the defaults
of `run`'s options, so the command line wins over the file, and both are checked by the same types.
A function takes the section it uses, not the whole `SweepConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

import click
import torch
import yaml

from clothing.data import shown
from clothing.engines import ENGINES
from clothing.extract import PRECISIONS
from clothing.model import MAX_FINETUNE_BLOCKS, TORCHVISION_WEIGHTS
from sweep.settings import (
    FiniteFloat,
    Jobs,
    SettingError,
    check_file_value,
    is_integer,
    is_number,
    setting,
    settings_of,
)
from sweep.space import DIMENSIONS, Dimension, resolve
from sweep.stores import DEFAULT_OUTAGE_SECONDS, RUNS_DIR, STORAGE_ENV, mask_url, sqlite_path, study_lock

MAX_EPOCHS = 1000
HOLDOUT_FOLDS = 5  # the bench's k-fold estimate over train/ (sweep.data.fold_rows)
FINETUNE_STAGE_SUFFIX = ".finetune"  # stage 2's study: `<study>.finetune`, in the same storage


def default_storage() -> str:
    return f"sqlite:///{(RUNS_DIR / 'optuna.db').resolve()}"


def default_tracking_uri() -> str:
    return f"sqlite:///{(RUNS_DIR / 'mlflow.db').resolve()}"


def default_cache_dir() -> Path:
    return RUNS_DIR / "cache"


class SweepFileError(ValueError):
    """The sweep file cannot be used; the message names the key and what it may be."""


class SweepError(RuntimeError):
    """The sweep cannot go on; the message says why."""


def resolve_device(name: str) -> torch.device:
    """The device `--device` names; auto picks CUDA when there is one."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SweepError("--device cuda was asked for but no CUDA GPU is available; use --device cpu or auto")
    return torch.device(name)


@dataclass(frozen=True)
class Stores:
    """Where a study lives: its name, the Optuna storage and the MLflow tracking store, parsed once."""

    TITLE: ClassVar[str] = "Stores"
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
        "At start-up an unreachable store is an error at once (a --jobs worker's start waits it out).",
    )

    @cached_property
    def storage_file(self) -> Path | None:
        """The Optuna storage's SQLite file, if it is one."""
        return sqlite_path(self.storage)

    @cached_property
    def tracking_file(self) -> Path | None:
        """The tracking store's SQLite file, if it is one."""
        return sqlite_path(self.tracking_uri)

    @cached_property
    def shown_storage(self) -> str:
        return mask_url(self.storage)

    @cached_property
    def shown_tracking(self) -> str:
        return mask_url(self.tracking_uri)

    @property
    def finetune_study(self) -> str:
        return self.study + FINETUNE_STAGE_SUFFIX

    def lock(self, study_name: str | None = None, outage_seconds: float = 0):
        """The lock that guards a study's trial count (this one's by default), for every worker."""
        return study_lock(self.storage, study_name or self.study, outage_seconds)


@dataclass(frozen=True)
class DataSettings:
    """The images, the backbone and where its features are computed and cached."""

    TITLE: ClassVar[str] = "Data"
    data_dir: Path = setting(
        Path("data/clothing-dataset-small"),
        click.Path(path_type=Path),
        "Folder of image folders: train/ and validation/ (one sub-folder per class), optionally test/ "
        "(env CLOTHING_DATA_DIR).",
        envvar="CLOTHING_DATA_DIR",
    )
    backbone_weights: str = setting(
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
    image_size: int = setting(
        256,
        click.IntRange(32, 1024),  # 32: the smallest side MobileNetV2's five stride-2 stages leave a pixel of
        "Side of the square every image is resized to for the backbone (features, stage 2, the exported model "
        "and predict); larger sees more detail at (size/224)^2 the backbone's work.",
        in_file=True,
    )
    views: int = setting(
        2,
        click.IntRange(1, 16),
        "Cached views per training image: 1 the plain image, 2 adds its mirror, more add the course's random "
        "rotation/crop/flip; each epoch draws one view per image. Each view costs one backbone pass.",
        in_file=True,
    )
    skip_bad_images: bool = setting(
        False,
        bool,
        "Leave unreadable images out (listed on the parent run) instead of stopping.",
        flag="--skip-bad-images",
    )
    device: str = setting(
        "auto", click.Choice(["auto", "cpu", "cuda"]), "Where to run; auto picks CUDA when available."
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
    # The bench's held-out estimate (sweep.data.fold_rows): set in a sweep file, never by a user's run.
    holdout_fold: int = setting(
        0,
        click.IntRange(0, HOLDOUT_FOLDS),
        f"Leave fold N of {HOLDOUT_FOLDS} of train/ (stratified; the same folds for every run) out of every "
        "trial, for an estimate no trial or rule saw; 0: none.",
        in_file=True,
        cli=False,
    )


@dataclass(frozen=True)
class Stage1Settings:
    """The sweep: how many trials, each a head trained on cached features, and the winner rule."""

    TITLE: ClassVar[str] = "Stage 1: the sweep"
    trials: int = setting(
        20,
        click.IntRange(1, 1_000_000),
        "Target number of finished (COMPLETE or PRUNED) trials; a re-run only adds what is missing.",
        in_file=True,
    )
    epochs: int = setting(10, click.IntRange(1, MAX_EPOCHS), "Epochs per trial.", in_file=True)
    batch_size: int = setting(
        32, click.IntRange(1, 65_536), "Training batch size (both stages).", in_file=True, cli=False
    )
    seed: int = setting(
        42,
        click.IntRange(0, 2**32 - 1),
        "Sampler and training seed; each trial's draws are seeded from it and the trial's number.",
        in_file=True,
    )
    tolerance: float = setting(
        0.01,
        FiniteFloat(0, 1),
        "Winner rule: trials within this much of the best val_acc compete on the smallest gap.",
        in_file=True,
    )
    pruner: str = setting(
        "median",
        click.Choice(["median", "none"]),
        "Optuna's MedianPruner on stage 1's per-epoch val_acc, or none (stage 2 stops by --finetune-patience).",
        in_file=True,
    )
    jobs: int = setting(
        1,
        Jobs(),
        "Worker processes on this machine sharing the stage-1 trials, each with an equal share of the cores "
        "(features are extracted once first); auto: one per core.",
    )
    # The searched dimensions (sweep.space.resolve): a sweep file's `space`, else the default space.
    space: tuple[Dimension, ...] = field(default_factory=lambda: resolve(None))


@dataclass(frozen=True)
class Stage2Settings:
    """Then fine-tune the stage-1 winner's last blocks on activations cached at the cut."""

    TITLE: ClassVar[str] = "Stage 2: fine-tuning the winner"
    finetune_blocks: int = setting(
        3,
        click.IntRange(0, MAX_FINETUNE_BLOCKS),
        "Fine-tune the stage-1 winner's last K inverted-residual blocks (and the final 1x1 conv) on activations "
        "cached at the cut, as one trial tagged stage=finetune; 0 = no stage 2.",
        in_file=True,
    )
    finetune_epochs: int = setting(
        6, click.IntRange(1, MAX_EPOCHS), "At most this many epochs of stage 2.", in_file=True
    )
    finetune_lr: float = setting(
        1e-4,
        FiniteFloat(1e-7, 1e-2),
        "Learning rate of stage 2 (blocks and head): small, so the pretrained blocks are adjusted, not overwritten.",
        in_file=True,
    )
    finetune_patience: int = setting(
        1,
        click.IntRange(0, MAX_EPOCHS),
        "Stage 2 stops after this many epochs in a row without a better val_acc (the checkpoint is the best "
        "epoch's); 0: all --finetune-epochs.",
        in_file=True,
    )
    finetune_precision: str = setting(
        "auto",
        click.Choice(("auto", "fp32", "bf16")),
        "Stage 2 trains in bf16 (autocast, fp32 master weights) or fp32; auto: bf16 where the features are bf16 "
        "on hardware that runs it natively, else fp32.",
        in_file=True,
        cli=False,
    )


SECTIONS = (Stores, DataSettings, Stage1Settings, Stage2Settings)
SETTINGS = settings_of(*SECTIONS)  # every setting of `run`, by name


@dataclass(frozen=True)
class SweepConfig:
    """Everything `python -m sweep run` was asked to do, by section."""

    stores: Stores = field(default_factory=Stores)
    data: DataSettings = field(default_factory=DataSettings)
    stage1: Stage1Settings = field(default_factory=Stage1Settings)
    stage2: Stage2Settings = field(default_factory=Stage2Settings)
    quiet: bool = False

    @classmethod
    def of(cls, dimensions: tuple[Dimension, ...] | None = None, quiet: bool = False, **settings: Any) -> SweepConfig:
        """The config of `run`'s settings given by name (the defaults for the rest), with a sweep
        file's space if there is one."""
        unknown = settings.keys() - SETTINGS.keys()
        if unknown:
            raise TypeError(f"not settings of run: {', '.join(sorted(unknown))}")

        def section(kind: type, **extra: Any) -> Any:
            return kind(**{k: v for k, v in settings.items() if k in settings_of(kind)}, **extra)

        stage1 = section(Stage1Settings, space=resolve(dimensions))
        return cls(section(Stores), section(DataSettings), stage1, section(Stage2Settings), quiet)

    def sections(self) -> tuple:
        return self.stores, self.data, self.stage1, self.stage2

    def settings(self, in_file: bool = False) -> dict[str, Any]:
        """Every setting's value by name (only those a sweep file may hold, when `in_file`)."""
        return {
            name: getattr(section, name)
            for section in self.sections()
            for name, (_, how) in settings_of(type(section)).items()
            if how.in_file or not in_file
        }

    def params(self) -> dict[str, str]:
        """The sweep's settings as the parent run's params: every setting but the secret ones (a store
        URL may hold a password), in words a user reads, and the searched space (`space.lr`, ...)."""
        values = {name: value for name, value in self.settings().items() if not SETTINGS[name][1].secret}
        shown_values = {name: shown(v) if isinstance(v, Path) else str(v) for name, v in values.items()}
        return shown_values | {f"space.{dim.name}": dim.describe() for dim in self.stage1.space}

    def resolved_file(self) -> str:
        """The resolved sweep (every setting a file holds, the whole space) as a sweep file: what the run used."""
        document = {**self.settings(in_file=True), "space": {d.name: d.as_dict() for d in self.stage1.space}}
        return yaml.safe_dump(document, sort_keys=False)


KINDS = ("float", "log-float", "int", "categorical")
# What each parameter's values may be, whatever range a file gives.
VALUE_BOUNDS = {
    "lr": (0.0, 10.0),
    "size_inner": (0, 100_000),
    "dropout": (0.0, 0.99),
    "weight_decay": (0.0, 1.0),
    "label_smoothing": (0.0, 0.99),
}
INTEGER_PARAMETERS = ("size_inner",)


def parse_space(document: object) -> tuple[Dimension, ...]:
    """A sweep file's `space`: a mapping of parameter names to dimensions. SettingError names the key."""
    if not isinstance(document, dict):
        raise SettingError("space must be a mapping of parameter names to dimensions")
    for name in document:
        if name not in DIMENSIONS:
            raise SettingError(f"unknown parameter space.{name}; the searchable ones are {', '.join(DIMENSIONS)}")
    return tuple(_dimension(name, spec) for name, spec in document.items())


def _dimension(name: str, spec: object) -> Dimension:
    where = f"space.{name}"
    if not isinstance(spec, dict) or spec.get("type") not in KINDS:
        raise SettingError(f"{where}.type must be one of {', '.join(KINDS)} (a mapping with a type)")
    kind = spec["type"]
    allowed = {"type", "choices"} if kind == "categorical" else {"type", "low", "high"}
    for key in spec:
        if key not in allowed:
            raise SettingError(f"unknown key {where}.{key}; a {kind} dimension has {', '.join(sorted(allowed))}")
    integer = name in INTEGER_PARAMETERS or kind == "int"
    if integer and kind in ("float", "log-float"):
        raise SettingError(f"{where}.type is {kind}; {name} takes integers: int or categorical")
    low, high = VALUE_BOUNDS[name]
    what = f"{'integers' if integer else 'numbers'} in [{low:g}, {high:g}]"

    def fits(value: object) -> bool:
        return (is_integer(value) if integer else is_number(value)) and low <= value <= high

    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices or not all(fits(c) for c in choices):
            raise SettingError(f"{where}.choices must be a non-empty list of {what}")
        return Dimension(name, kind, choices=tuple(choices))
    return _range(where, kind, spec.get("low"), spec.get("high"), fits, what, integer)


def _range(where: str, kind: str, first, last, fits, what: str, integer: bool) -> Dimension:  # noqa: PLR0913
    for key, value in (("low", first), ("high", last)):
        if not fits(value):
            raise SettingError(f"{where}.{key} must be one of the {what}")
    if not first < last:
        raise SettingError(f"{where} is an empty range: low ({first:g}) must be below high ({last:g})")
    if kind == "log-float" and first <= 0:
        raise SettingError(f"{where} is a log range, so low must be above 0 (it is {first:g})")
    name = where.removeprefix("space.")
    return Dimension(name, kind, *((first, last) if integer else (float(first), float(last))))


def read_sweep_file(path: Path) -> tuple[dict, tuple[Dimension, ...] | None]:
    """(the settings, as defaults for `run`'s options; the space's dimensions, None without a `space`)."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise SweepFileError(f"cannot read {shown(path)}: {exc.strerror or exc}") from exc
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise SweepFileError(f"{shown(path)} is not valid YAML ({str(exc).splitlines()[0]})") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SweepFileError(f"{shown(path)} must be a mapping of settings and a `space`")
    try:
        settings = {key: check_file_value(SETTINGS, key, value) for key, value in data.items() if key != "space"}
        dimensions = parse_space(data["space"]) if "space" in data else None
    except SettingError as exc:
        raise SweepFileError(str(exc)) from exc
    return settings, dimensions
