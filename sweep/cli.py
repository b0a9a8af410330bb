"""`python -m sweep`: run, best, predict. Thin: parse options, call the library, echo results."""

from __future__ import annotations

import functools
import json
import math
import os
import sys
from pathlib import Path

import click

import clothing
from clothing.checkpoint import CheckpointError, load_model, spec_of
from clothing.data import DatasetError, shown
from clothing.engines import ENGINES, EngineError
from clothing.extract import PRECISIONS
from clothing.model import MAX_FINETUNE_BLOCKS, TORCHVISION_WEIGHTS, BackboneError
from clothing.predict import prediction_lines, read_images, unreadable_summary
from clothing.predict import top_k as predict_top_k
from sweep.config import SweepConfig, default_cache_dir, default_storage, default_tracking_uri
from sweep.finetune import EMA_DECAY
from sweep.pipeline import quiet_libraries, run_sweep
from sweep.select import DEFAULT_TOLERANCE, HEAD_STAGE, select_winner
from sweep.space import (
    AVERAGES,
    FINETUNE_LR_RANGE,
    FINETUNE_SEARCH_LR,
    MAX_EPOCHS,
    MAX_LABEL_SMOOTHING,
    OPTIONAL_DIMENSIONS,
    SCHEDULES,
)
from sweep.stores import STORAGE_ENV, StorageError
from sweep.study import SweepError, load_studies, study_tolerance, trial_records
from sweep.sweepfile import SweepFileError, read_sweep_file
from sweep.table import format_table, record_rows, rows_to_csv
from sweep.tracking import REGISTRY_FORMATS, Tracker, TrackingError, browse_hint
from sweep.winner import BestOptions, run_best

MAX_JOBS = 64  # worker processes on one machine; more is a typo, not a plan (each holds a torch runtime)
USER_ERRORS = (DatasetError, BackboneError, EngineError, CheckpointError, TrackingError, SweepError, StorageError)


def user_errors(command):
    """Turn the library's expected errors into one `Error: ...` line and exit status 1. So does any
    OSError from a path the user gave (a name too long, a file where a folder belongs, no permission):
    it names the path and what the system said."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except USER_ERRORS as exc:
            raise click.ClickException(str(exc)) from exc
        except OSError as exc:
            if exc.filename is None:
                raise
            raise click.ClickException(f"{shown(exc.filename)}: {exc.strerror or exc}") from exc

    return wrapper


class Jobs(click.IntRange):
    """A number of worker processes, or "auto": one per CPU core."""

    name = "integer or auto"

    def __init__(self) -> None:
        super().__init__(1, MAX_JOBS)

    def convert(self, value, param, ctx):
        if value == "auto":
            return min(os.cpu_count() or 1, MAX_JOBS)
        return super().convert(value, param, ctx)


class FiniteFloat(click.FloatRange):
    """A FloatRange that also refuses nan and +-inf (click's own lets nan through every bound)."""

    name = "finite float"

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


def _apply(options, command):
    for option in reversed(options):
        command = option(command)
    return command


def study_options(command):
    """Options that name a study and its stores."""
    return _apply(
        [
            click.option(
                "--study", default="clothing", show_default=True, help="Optuna study name = MLflow experiment name."
            ),
            click.option(
                "--storage",
                envvar=STORAGE_ENV,
                default=default_storage,
                show_default=f"${STORAGE_ENV}, else sqlite:///<abs>/mlruns/optuna.db",
                help="Optuna storage URL (SQLite, PostgreSQL, MySQL, ...); keep a PostgreSQL password in "
                "PGPASSWORD or ~/.pgpass, not in the URL.",
            ),
            click.option(
                "--tracking-uri",
                envvar="MLFLOW_TRACKING_URI",
                default=default_tracking_uri,
                show_default="$MLFLOW_TRACKING_URI, else sqlite:///<abs>/mlruns/mlflow.db",
                help="MLflow tracking store or server; a server's login comes from MLFLOW_TRACKING_USERNAME "
                "and MLFLOW_TRACKING_PASSWORD.",
            ),
        ],
        command,
    )


def data_options(command):
    """Options that name the data, the backbone and where to compute."""
    return _apply(
        [
            click.option(
                "--data-dir",
                envvar="CLOTHING_DATA_DIR",
                default="data/clothing-dataset-small",
                show_default=True,
                type=click.Path(path_type=Path),
                help="Folder with train/, validation/ and optionally test/ (env CLOTHING_DATA_DIR).",
            ),
            click.option(
                "--backbone-weights",
                envvar="CLOTHING_BACKBONE_WEIGHTS",
                default=TORCHVISION_WEIGHTS,
                show_default=True,
                help="Local MobileNetV2 state_dict, or IMAGENET1K_V1 to download torchvision's "
                "(env CLOTHING_BACKBONE_WEIGHTS).",
            ),
            click.option(
                "--cache-dir",
                envvar="CLOTHING_CACHE_DIR",
                default=default_cache_dir,
                show_default="mlruns/cache",
                type=click.Path(path_type=Path),
                help="Where cached features live (env CLOTHING_CACHE_DIR).",
            ),
            click.option(
                "--device",
                type=click.Choice(["auto", "cpu", "cuda"]),
                default="auto",
                show_default=True,
                help="Where to run; auto picks CUDA when available.",
            ),
        ],
        command,
    )


TOLERANCE_HELP = "Winner rule: trials within this much of the best val_acc compete on the smallest gap."
tolerance_option = click.option(
    "--tolerance", default=DEFAULT_TOLERANCE, show_default=True, type=FiniteFloat(min=0), help=TOLERANCE_HELP
)
# `best` and `trials` apply the rule the study was run with, unless told otherwise.
study_tolerance_option = click.option(
    "--tolerance",
    default=None,
    show_default=f"the study's own (run --tolerance), {DEFAULT_TOLERANCE} for older studies",
    type=FiniteFloat(min=0),
    help=TOLERANCE_HELP,
)


SPACE_KEY = "sweep.space"  # where --config leaves the file's space for `run`


def load_sweep_file(ctx: click.Context, param: click.Parameter, path: Path | None) -> None:
    """--config, read before the other options: its settings become their defaults (so the command
    line wins), its space goes to `run` through the context."""
    if path is None:
        return
    try:
        settings, space = read_sweep_file(path)
    except SweepFileError as exc:
        raise click.BadParameter(str(exc), ctx, param) from exc
    ctx.default_map = {**(ctx.default_map or {}), **settings}
    ctx.meta[SPACE_KEY] = space


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(version=clothing.__version__, prog_name="sweep")
def cli() -> None:
    """Hyperparameter sweeps with experiment tracking for the clothing classifier.

    `run` a study, list its `trials`, pick the `best` one, `predict` with the exported model.
    """
    quiet_libraries()
    # Backstop for a path we print without shown(): escape what the terminal cannot take, never crash.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")


@cli.command()
@study_options
@data_options
@click.option(
    "--trials",
    default=20,
    show_default=True,
    type=click.IntRange(min=1),
    help="Target number of finished (COMPLETE or PRUNED) trials; a re-run only adds what is missing.",
)
@click.option("--epochs", default=10, show_default=True, type=click.IntRange(1, MAX_EPOCHS), help="Epochs per trial.")
@click.option(
    "--seed",
    default=42,
    show_default=True,
    type=click.IntRange(0, 2**32 - 1),
    help="Sampler and training seed; each trial's draws are seeded from it and the trial's number.",
)
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1), help="Training batch size.")
@click.option(
    "--pruner",
    type=click.Choice(["median", "none"]),
    default="median",
    show_default=True,
    help="Optuna MedianPruner on per-epoch val accuracy, or none.",
)
@click.option(
    "--precision",
    type=click.Choice(PRECISIONS),
    default="auto",
    show_default=True,
    help="Feature extraction: exact (eager torch fp32, the reference), fp32, bf16; "
    "auto picks the fastest the hardware runs natively. All stay within cosine 0.99 of exact.",
)
@click.option(
    "--engine",
    type=click.Choice(ENGINES),
    default="auto",
    show_default=True,
    help="What runs the frozen backbone over the images: openvino (the fast CPU runtime) or torch (the "
    "reference, and the only one on a GPU or with --precision exact); auto picks openvino where it applies.",
)
@click.option(
    "--skip-bad-images",
    is_flag=True,
    help="Leave unreadable images out (listed on the parent run) instead of stopping.",
)
@click.option(
    "--search",
    type=click.Choice(OPTIONAL_DIMENSIONS),
    multiple=True,
    help="Also search this dimension (repeatable): dropout {0, 0.2, 0.5}, weight_decay [1e-6, 1e-2] log, "
    "label_smoothing {0, 0.1, 0.2}. Off, each keeps 0.",
)
@click.option(
    "--jobs",
    default="1",
    show_default=True,
    type=Jobs(),
    help="Worker processes on this machine sharing the study's stage-1 trials, each with an equal share of "
    "the cores (features are extracted once first); auto: one per core.",
)
@click.option(
    "--views",
    default=1,
    show_default=True,
    type=click.IntRange(1, 16),
    help="Cached views per training image: 1 the plain image, 2 adds its mirror, more add the course's "
    "random rotation/crop/flip; each epoch draws one view per image. Each view costs one backbone pass.",
)
@click.option(
    "--finetune-blocks",
    default=0,
    show_default=True,
    type=click.IntRange(0, MAX_FINETUNE_BLOCKS),
    help="Stage 2: then fine-tune the winner's last K inverted-residual blocks (and the final 1x1 conv) "
    "on activations cached at the cut, as trials tagged stage=finetune (see --finetune-trials); 0 = off.",
)
@click.option(
    "--finetune-epochs", default=10, show_default=True, type=click.IntRange(1, MAX_EPOCHS), help="Epochs of stage 2."
)
@click.option(
    "--finetune-lr",
    default=3e-5,
    show_default=True,
    type=FiniteFloat(*FINETUNE_LR_RANGE),
    help="Learning rate of stage 2 (blocks and head): small, so the pretrained blocks are adjusted, not overwritten.",
)
@click.option(
    "--finetune-trials",
    default=1,
    show_default=True,
    type=click.IntRange(1, 100),
    help="Stage-2 trials: 1 runs the fixed recipe (--finetune-blocks, --finetune-lr); more search the block "
    "count in [1, --finetune-blocks] (cycled, deepest first) and the lr in [{:g}, {:g}] (log), with pruning.".format(
        *FINETUNE_SEARCH_LR
    ),
)
@click.option(
    "--finetune-average",
    type=click.Choice(AVERAGES),
    default="none",
    show_default=True,
    help=f"Stage 2: ema validates and keeps an exponential moving average of the weights (decay {EMA_DECAY:g} a step).",
)
@click.option(
    "--finetune-schedule",
    type=click.Choice(SCHEDULES),
    default="constant",
    show_default=True,
    help="Stage 2's lr: constant, or cosine (annealed to 0 over the trial's steps).",
)
@click.option(
    "--finetune-label-smoothing",
    default=0.0,
    show_default=True,
    type=FiniteFloat(0, MAX_LABEL_SMOOTHING),
    help="Stage 2's label smoothing (stage 1's is searched with --search label_smoothing).",
)
@click.option(
    "--holdout",
    default=0.0,
    show_default=True,
    type=FiniteFloat(0, 0.5, max_open=True),
    help="Leave this fraction of train/ (stratified) out of every trial, for an estimate no trial or rule "
    "saw (make bench-accuracy); 0 = none.",
)
@click.option(
    "--holdout-seed",
    default=0,
    show_default=True,
    type=click.IntRange(0, 2**32 - 1),
    help="Which images --holdout leaves out.",
)
@click.option(
    "--system-metrics/--no-system-metrics",
    default=True,
    show_default=True,
    help="Log MLflow's system metrics (CPU, memory, disk, network, GPU) on the parent run while trials run.",
)
@click.option("--quiet", is_flag=True, help="No progress output.")
@click.option(
    "--config",
    "sweep_file",
    type=click.Path(dir_okay=False, path_type=Path),
    is_eager=True,
    expose_value=False,
    callback=load_sweep_file,
    help="A sweep file (YAML: settings and search space, see sweeps/default.yaml); options given on the "
    "command line win over it.",
)
@tolerance_option
@user_errors
def run(jobs: int, quiet: bool, **options) -> None:
    """Run or resume a study.

    Checks every input, caches the backbone's features once, then trains a head per trial (and with
    --finetune-blocks, fine-tunes the winner), each trial a nested MLflow run.
    """
    space = click.get_current_context().meta.get(SPACE_KEY, ())
    cfg = SweepConfig(**options, space=space, progress=not quiet)
    say = (lambda _: None) if quiet else click.echo
    result = run_sweep(cfg, say, jobs=jobs)
    click.echo(format_table(record_rows(result.records, select_winner(result.records))))
    click.echo(f"\nBrowse the runs: {browse_hint(Tracker(cfg.tracking_uri), cfg.study)}")
    if result.errors and result.finished_here == 0:
        raise SweepError(f"every trial of this run failed; first error: {result.errors[0]}")
    if result.errors:
        click.echo(f"{len(result.errors)} trial(s) failed; first error: {result.errors[0]}", err=True)


@cli.command()
@study_options
@data_options
@study_tolerance_option
@click.option(
    "--export",
    "export_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the winner as a self-contained model file here.",
)
@click.option("--tta", is_flag=True, help="Also report val_acc with test-time augmentation (image + mirror).")
@click.option(
    "--register",
    "register_name",
    default=None,
    help="Also register the winner in the MLflow model registry under this name.",
)
@click.option(
    "--register-format",
    type=click.Choice(REGISTRY_FORMATS),
    default="pickle",
    show_default=True,
    help="How --register stores the model: pickle loads as the project's nn.Module but runs code when "
    "loaded; pt2 (torch.export) loads without unpickling anything, as a graph with a dynamic batch size.",
)
@user_errors
def best(**options) -> None:
    """Show the winner; export, register, score it.

    Ranks the trials by the winner rule and marks the winner in MLflow; scores it on test/ when the
    data folder has one, and on request exports it (--export) or registers it (--register).
    """
    run_best(BestOptions(**options), click.echo)


SORT_KEYS = {
    "number": lambda r: (r.stage != HEAD_STAGE, r.number),
    "val_acc": lambda r: (r.val_acc is None, -(r.val_acc or 0), r.number),
    "gap": lambda r: (r.gap is None, r.gap or 0, r.number),
}


@cli.command()
@study_options
@click.option(
    "--sort",
    "sort_by",
    type=click.Choice(list(SORT_KEYS)),
    default="number",
    show_default=True,
    help="Order of the rows.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "csv", "json"]),
    default="table",
    show_default=True,
    help="Aligned table for a terminal, or CSV / JSON for programs.",
)
@study_tolerance_option
@user_errors
def trials(study, storage, tracking_uri, sort_by, fmt, tolerance) -> None:
    """List a study's trials (table, CSV or JSON).

    Every trial of both stages with its state, parameters, scores and MLflow run id; the winner starred.
    """
    stage1, stage2 = load_studies(study, storage)
    records = trial_records(stage1, stage2)
    winner = select_winner(records, study_tolerance(stage1, tolerance))
    rows = record_rows(sorted(records, key=SORT_KEYS[sort_by]), winner)
    if fmt == "json":
        click.echo(json.dumps(rows, indent=2))
    elif fmt == "csv":
        click.echo(rows_to_csv(rows), nl=False)
    else:
        click.echo(format_table(rows, with_run_id=True))


@cli.command()
@click.argument("model_file", metavar="MODEL", type=click.Path(path_type=Path))
@click.argument("images", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--top-k", default=3, show_default=True, type=click.IntRange(min=1), help="Classes to show per image.")
@click.option("--tta", is_flag=True, help="Average the logits of each image and its mirror image.")
@user_errors
def predict(model_file: Path, images: tuple[str, ...], top_k: int, tta: bool) -> None:
    """Classify images with an exported model.

    Top-k classes of each IMAGE with a MODEL written by `best --export` (no network, nothing else needed).
    """
    model, payload = load_model(model_file)
    spec = spec_of(payload)
    readable, unreadable = read_images(images)
    predictions = predict_top_k(model, [image for _, image in readable], spec.transform(), spec.classes, top_k, tta=tta)
    for line in prediction_lines([path for path, _ in readable], predictions):
        click.echo(line)
    if unreadable:
        raise click.ClickException(unreadable_summary(unreadable, len(images)))
