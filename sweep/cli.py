"""`python -m sweep`: run, trials, best, predict. Thin: parse options, call the library, echo results."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import click

import clothing
from clothing.checkpoint import CheckpointError, load_model, spec_of
from clothing.data import DatasetError, shown
from clothing.engines import EngineError
from clothing.inference import BatchOptions, find_images, predict_files, write_predictions
from clothing.model import BackboneError, load_backbone
from clothing.predict import prediction_lines, unreadable_summary
from clothing.scoring import model_from_checkpoint
from sweep.best import BestOptions, run_best
from sweep.config import (
    SETTINGS,
    DataSettings,
    Stage1Settings,
    Stage2Settings,
    Stores,
    SweepConfig,
    SweepError,
    SweepFileError,
    read_sweep_file,
    resolve_device,
)
from sweep.pipeline import quiet_libraries, run_sweep
from sweep.ranking import HEAD_STAGE, format_table, rows_to_csv
from sweep.registry import REGISTRY_FORMATS
from sweep.settings import GroupedCommand, option, options
from sweep.stores import StorageError, StoreOutage
from sweep.study import read_studies
from sweep.tracking import LOGGED_MODEL, Tracker, TrackingError

USER_ERRORS = (
    DatasetError,
    BackboneError,
    EngineError,
    CheckpointError,
    TrackingError,
    SweepError,
    StorageError,
    StoreOutage,
)
# `best` and `trials` apply the rule the study was run with, and `best` reads the data the run
# recorded, unless told otherwise.
STUDY_TOLERANCE = {"default": None, "show_default": "the study's own (run --tolerance)"}
RECORDED = {"default": None, "show_default": "what the run recorded"}
OUTPUT = "Output"


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


def load_sweep_file(ctx: click.Context, param: click.Parameter, path: Path | None) -> tuple[dict, tuple | None]:
    """--config, read before the other options: its settings become their options' defaults (so the
    command line wins, and click converts both with the same types); the value is what only a file
    sets: (those settings, the search space)."""
    if path is None:
        return {}, None
    try:
        settings, dimensions = read_sweep_file(path)
    except SweepFileError as exc:
        raise click.BadParameter(str(exc), ctx, param) from exc
    ctx.default_map = {**(ctx.default_map or {}), **settings}
    return {name: value for name, value in settings.items() if not SETTINGS[name][1].cli}, dimensions


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(version=clothing.__version__, prog_name="sweep")
def cli() -> None:
    """Hyperparameter sweeps with experiment tracking for transfer learning on your image folders
    (train/, validation/, optional test/; the clothing dataset by default).

    `run` a study, list its `trials`, pick the `best` one, `predict` with the exported model.
    """
    quiet_libraries()
    # Backstop for a path we print without shown(): escape what the terminal cannot take, never crash.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")


WIDE = option(
    "--wide",
    is_flag=True,
    group=OUTPUT,
    help="Show every column of the trials table, the MLflow run and logged-model ids too (by default it fits 120 "
    "columns, the settings its rows share said once above it).",
)


@cli.command(cls=GroupedCommand)
@option(
    "--config",
    "sweep_file",
    type=click.Path(dir_okay=False, path_type=Path),
    is_eager=True,
    callback=load_sweep_file,
    group="Sweep file",
    help="A sweep file (YAML): what differs from the defaults, and stage 1's search space (see sweeps/plain.yaml); "
    "options given on the command line win over it.",
)
@options(Stores)
@options(DataSettings)
@options(Stage1Settings)
@options(Stage2Settings)
@option("--quiet", is_flag=True, group=OUTPUT, help="No progress output.")
@WIDE
@user_errors
def run(sweep_file: tuple[dict, tuple | None], quiet: bool, wide: bool, **settings) -> None:
    """Run or resume a study.

    Checks every input, caches the backbone's features once, trains a head per trial, then fine-tunes
    the winner's last blocks; each trial is a nested MLflow run. The defaults are the recommended
    recipe.
    """
    file_only, dimensions = sweep_file
    cfg = SweepConfig.of(dimensions, quiet, **settings, **file_only)
    result = run_sweep(cfg, (lambda _: None) if quiet else click.echo)
    click.echo(format_table(result.ranking.rows(), wide))
    click.echo(f"\nBrowse the runs: {result.browse}")
    if result.errors and result.finished_here == 0:
        raise SweepError(f"every trial of this run failed; first error: {result.errors[0]}")
    if result.errors:
        click.echo(f"{len(result.errors)} trial(s) failed; first error: {result.errors[0]}", err=True)


@cli.command(cls=GroupedCommand)
@options(Stores, "study", "storage", "tracking_uri")
@options(
    DataSettings,
    "data_dir",
    "backbone_weights",
    "device",
    **dict.fromkeys(("data_dir", "backbone_weights"), RECORDED),
)
@options(Stage1Settings, "tolerance", tolerance=STUDY_TOLERANCE)
@option(
    "--export",
    "export_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    group=OUTPUT,
    help="Write the winner as a self-contained model file here.",
)
@option("--tta", is_flag=True, group=OUTPUT, help="Also report val_acc with test-time augmentation (image + mirror).")
@option(
    "--register",
    "register_name",
    default=None,
    group=OUTPUT,
    help="Also register the winner in the MLflow model registry under this name.",
)
@option(
    "--register-format",
    type=click.Choice(REGISTRY_FORMATS),
    default="pyfunc",
    show_default=True,
    group=OUTPUT,
    help="How --register stores the model: pyfunc takes image bytes and answers labels (what `mlflow models "
    "serve` serves; nothing unpickled); pytorch is the nn.Module, a pickle that runs code when loaded; pt2 "
    "(torch.export) is a graph with a dynamic batch size; both take normalised tensors.",
)
@WIDE
@user_errors
def best(study, storage, tracking_uri, **given) -> None:
    """Show the winner; export, register, score it.

    Ranks the trials by the winner rule and marks the winner in MLflow; scores it on test/ when the
    data folder has one, and on request exports it (--export) or registers it (--register).
    """
    run_best(BestOptions(Stores(study, storage, tracking_uri), **given), click.echo)


SORT_KEYS = {
    "number": lambda r: (r.stage != HEAD_STAGE, r.number),
    "val_acc": lambda r: (r.val_acc is None, -(r.val_acc or 0), r.number),
    "gap": lambda r: (r.gap is None, r.gap or 0, r.number),
}


@cli.command(cls=GroupedCommand)
@options(Stores, "study", "storage")
@options(Stage1Settings, "tolerance", tolerance=STUDY_TOLERANCE)
@option(
    "--sort",
    "sort_by",
    type=click.Choice(list(SORT_KEYS)),
    default="number",
    show_default=True,
    group=OUTPUT,
    help="Order of the rows.",
)
@option(
    "--format",
    "fmt",
    type=click.Choice(["table", "csv", "json"]),
    default="table",
    show_default=True,
    group=OUTPUT,
    help="Aligned table for a terminal, or CSV / JSON for programs.",
)
@WIDE
@user_errors
def trials(study, storage, tolerance, sort_by, fmt, wide) -> None:  # noqa: PLR0913 - its options
    """List a study's trials (table, CSV or JSON).

    Every trial of both stages with its state, parameters and scores, the winner starred; the MLflow run
    and logged-model ids (`predict models:/<model_id>`) with --wide and in CSV and JSON.
    """
    ranking = read_studies(Stores(study, storage)).rank(tolerance)
    rows = ranking.rows(sorted(ranking.records, key=SORT_KEYS[sort_by]))
    if fmt == "json":
        click.echo(json.dumps(rows, indent=2))
    elif fmt == "csv":
        click.echo(rows_to_csv(rows), nl=False)
    else:
        click.echo(format_table(rows, wide))


LOGGED_MODEL_STORE = {"help": "The MLflow tracking store or server that holds a MODEL given as models:/<model_id>."}
LOGGED_MODEL_BACKBONE = {
    "help": "For a MODEL given as models:/<model_id>: the backbone weights its trial trained on, a local "
    "MobileNetV2 state_dict or IMAGENET1K_V1 (env CLOTHING_BACKBONE_WEIGHTS)."
}
PREDICT_ENGINE = {
    "help": "What runs the model's backbone: openvino (the fast CPU runtime) or torch (the reference, the only "
    "one on a GPU); auto picks openvino on a CPU for 1000 images or more, where its 3 s conversion pays off."
}


@cli.command(cls=GroupedCommand)
@click.argument("model_file", metavar="MODEL")
@click.argument("paths", metavar="PATH...", nargs=-1, required=True, type=click.Path())
@option("--top-k", default=3, show_default=True, type=click.IntRange(min=1), help="Classes to show per image.")
@option("--tta", is_flag=True, help="Average the logits of each image and its mirror image.")
@option(
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write one CSV row per image here (path,label,probability,top_k,error) instead of printing, with a "
    "progress bar on a terminal; an unreadable file is a row with its error and does not stop the run.",
)
@option("--batch-size", default=32, show_default=True, type=click.IntRange(1, 4096), help="Images per batch.")
@options(DataSettings, "device", "engine", engine=PREDICT_ENGINE)
@options(Stores, "tracking_uri", tracking_uri=LOGGED_MODEL_STORE)
@options(DataSettings, "backbone_weights", backbone_weights=LOGGED_MODEL_BACKBONE)
@user_errors
def predict(  # noqa: PLR0913 - its options
    model_file: str, paths: tuple[str, ...], output: Path | None, tracking_uri: str, backbone_weights: str, **how
) -> None:
    """Classify images with an exported model, or a trial's logged model.

    Top-k classes of each image with a MODEL written by `best --export` (no network, nothing else
    needed), or any trial's checkpoint as `models:/<model_id>` (its logged model in MLflow, rebuilt
    on the backbone weights it trained on; `sweep trials --wide` lists the ids). Each PATH is an
    image file or a folder, searched recursively (sorted) for image files.
    """
    if output is not None and not (output.parent if str(output.parent) else Path(".")).is_dir():
        raise click.ClickException(f"folder {shown(output.parent)} for --output does not exist; create it first")
    if model_file.startswith(LOGGED_MODEL):
        head = Tracker(tracking_uri).logged_checkpoint(model_file.removeprefix(LOGGED_MODEL))
        model, spec = model_from_checkpoint(head, load_backbone(backbone_weights)), spec_of(head)
    else:
        model, payload = load_model(model_file)
        spec = spec_of(payload)
    files = find_images(paths)
    progress = output is not None and sys.stderr.isatty()  # printed lines are their own progress
    device = str(resolve_device(how.pop("device")))
    results = predict_files(model, spec, files, BatchOptions(**how, device=device, progress=progress))
    if output is not None:
        errors = write_predictions(results, output)
        click.echo(f"Wrote {len(files)} predictions to {shown(output)}")
        if errors:
            click.echo(f"{len(errors)} of {len(files)} files could not be read; their rows say why", err=True)
        return
    errors = []
    for result in results:
        if result.error:
            errors.append(result.error)
            continue
        for line in prediction_lines([result.path], [result.top_k]):
            click.echo(line)
    if errors:
        raise click.ClickException(unreadable_summary(errors, len(files)))
