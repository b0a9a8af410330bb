"""`python -m sweep`: run, best, predict. Thin: parse options, call the library, echo results."""

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
from clothing.model import BackboneError
from clothing.predict import prediction_lines, unreadable_summary
from sweep.config import SweepConfig
from sweep.outages import StoreOutage
from sweep.pipeline import quiet_libraries, run_sweep
from sweep.ranking import rank
from sweep.registry import REGISTRY_FORMATS
from sweep.select import DEFAULT_TOLERANCE, HEAD_STAGE
from sweep.settings import options
from sweep.stores import StorageError
from sweep.study import SweepError, read_studies, resolve_device
from sweep.sweepfile import SweepFileError, read_sweep_file
from sweep.table import format_table, rows_to_csv
from sweep.tracking import TrackingError
from sweep.winner import BestOptions, run_best

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
STORES = ("study", "storage", "tracking_uri")  # the settings that name a study and its stores
DATA = ("data_dir", "backbone_weights", "cache_dir", "device")  # ... the data, the backbone, where to compute
# `best` and `trials` apply the rule the study was run with, unless told otherwise.
STUDY_TOLERANCE = {
    "default": None,
    "show_default": f"the study's own (run --tolerance), {DEFAULT_TOLERANCE} for older studies",
}


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


def load_sweep_file(ctx: click.Context, param: click.Parameter, path: Path | None) -> tuple:
    """--config, read before the other options: its settings become their defaults (so the command
    line wins, and click converts both with the same types); its search space is the value."""
    if path is None:
        return ()
    try:
        settings, space = read_sweep_file(path)
    except SweepFileError as exc:
        raise click.BadParameter(str(exc), ctx, param) from exc
    ctx.default_map = {**(ctx.default_map or {}), **settings}
    return space


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


WIDE = click.option(
    "--wide",
    is_flag=True,
    help="Show every column of the trials table, the MLflow run ids too (by default it fits 120 columns, the "
    "settings its rows share said once above it).",
)


@cli.command()
@options(SweepConfig)
@click.option(
    "--config",
    "space",
    type=click.Path(dir_okay=False, path_type=Path),
    is_eager=True,
    callback=load_sweep_file,
    help="A sweep file (YAML: settings and search space, see sweeps/default.yaml); options given on the "
    "command line win over it.",
)
@WIDE
@user_errors
def run(wide: bool, **settings) -> None:
    """Run or resume a study.

    Checks every input, caches the backbone's features once, then trains a head per trial (and with
    --finetune-blocks, fine-tunes the winner), each trial a nested MLflow run.
    """
    cfg = SweepConfig(**settings)
    say = (lambda _: None) if cfg.quiet else click.echo
    result = run_sweep(cfg, say)
    click.echo(format_table(result.ranking.rows(), wide))
    click.echo(f"\nBrowse the runs: {result.browse}")
    if result.errors and result.finished_here == 0:
        raise SweepError(f"every trial of this run failed; first error: {result.errors[0]}")
    if result.errors:
        click.echo(f"{len(result.errors)} trial(s) failed; first error: {result.errors[0]}", err=True)


@cli.command()
@options(SweepConfig, *STORES, *DATA, "tolerance", tolerance=STUDY_TOLERANCE)
@click.option(
    "--export",
    "export_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the winner as a self-contained model file here.",
)
@click.option("--tta", is_flag=True, help="Also report val_acc with test-time augmentation (image + mirror).")
@click.option(
    "--refit/--no-refit",
    default=True,
    show_default=True,
    help="Export and register the winner's refit on train + validation (`run --refit`) where it has one; "
    "--no-refit: the chosen trial's own model.",
)
@click.option(
    "--register",
    "register_name",
    default=None,
    help="Also register the winner in the MLflow model registry under this name.",
)
@click.option(
    "--register-format",
    type=click.Choice(REGISTRY_FORMATS),
    default="pyfunc",
    show_default=True,
    help="How --register stores the model: pyfunc takes image bytes and answers labels (what `mlflow models "
    "serve` serves; nothing unpickled); pytorch is the nn.Module, a pickle that runs code when loaded; pt2 "
    "(torch.export) is a graph with a dynamic batch size; both take normalised tensors.",
)
@WIDE
@user_errors
def best(**given) -> None:
    """Show the winner; export, register, score it.

    Ranks the trials by the winner rule and marks the winner in MLflow; scores it on test/ when the
    data folder has one, and on request exports it (--export) or registers it (--register).
    """
    run_best(BestOptions(**given), click.echo)


SORT_KEYS = {
    "number": lambda r: (r.stage != HEAD_STAGE, r.number),
    "val_acc": lambda r: (r.val_acc is None, -(r.val_acc or 0), r.number),
    "gap": lambda r: (r.gap is None, r.gap or 0, r.number),
}


@cli.command()
@options(SweepConfig, *STORES, "tolerance", tolerance=STUDY_TOLERANCE)
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
@WIDE
@user_errors
def trials(study, storage, tracking_uri, sort_by, fmt, tolerance, wide) -> None:  # noqa: PLR0913 - its options
    """List a study's trials (table, CSV or JSON).

    Every trial of both stages with its state, parameters and scores, the winner starred; the MLflow run
    ids with --wide and in CSV and JSON.
    """
    ranking = rank(read_studies(storage, study), tolerance)
    rows = ranking.rows(sorted(ranking.records, key=SORT_KEYS[sort_by]))
    if fmt == "json":
        click.echo(json.dumps(rows, indent=2))
    elif fmt == "csv":
        click.echo(rows_to_csv(rows), nl=False)
    else:
        click.echo(format_table(rows, wide))


PREDICT_ENGINE = {
    "help": "What runs the model's backbone: openvino (the fast CPU runtime) or torch (the reference, the only "
    "one on a GPU); auto picks openvino on a CPU for 1000 images or more, where its 3 s conversion pays off."
}


@cli.command()
@click.argument("model_file", metavar="MODEL", type=click.Path(path_type=Path))
@click.argument("paths", metavar="PATH...", nargs=-1, required=True, type=click.Path())
@click.option("--top-k", default=3, show_default=True, type=click.IntRange(min=1), help="Classes to show per image.")
@click.option("--tta", is_flag=True, help="Average the logits of each image and its mirror image.")
@click.option(
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write one CSV row per image here (path,label,probability,top_k,error) instead of printing, with a "
    "progress bar on a terminal; an unreadable file is a row with its error and does not stop the run.",
)
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1, 4096), help="Images per batch.")
@options(SweepConfig, "device", "engine", engine=PREDICT_ENGINE)
@user_errors
def predict(model_file: Path, paths: tuple[str, ...], output: Path | None, **how) -> None:
    """Classify images with an exported model.

    Top-k classes of each image with a MODEL written by `best --export` (no network, nothing else
    needed). Each PATH is an image file or a folder, searched recursively (sorted) for image files.
    """
    if output is not None and not (output.parent if str(output.parent) else Path(".")).is_dir():
        raise click.ClickException(f"folder {shown(output.parent)} for --output does not exist; create it first")
    model, payload = load_model(model_file)
    files = find_images(paths)
    progress = output is not None and sys.stderr.isatty()  # printed lines are their own progress
    device = str(resolve_device(how.pop("device")))
    batch = BatchOptions(**how, device=device, progress=progress)
    results = predict_files(model, spec_of(payload), files, batch)
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
