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
from clothing.model import BackboneError
from clothing.predict import prediction_lines, read_images, unreadable_summary
from clothing.predict import top_k as predict_top_k
from sweep.config import SweepConfig
from sweep.pipeline import quiet_libraries, run_sweep
from sweep.ranking import rank
from sweep.registry import REGISTRY_FORMATS
from sweep.select import DEFAULT_TOLERANCE, HEAD_STAGE
from sweep.settings import options
from sweep.stores import StorageError
from sweep.study import SweepError, read_studies
from sweep.sweepfile import SweepFileError, read_sweep_file
from sweep.table import format_table, rows_to_csv
from sweep.tracking import TrackingError
from sweep.winner import BestOptions, run_best

USER_ERRORS = (DatasetError, BackboneError, EngineError, CheckpointError, TrackingError, SweepError, StorageError)
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
    """Hyperparameter sweeps with experiment tracking for the clothing classifier.

    `run` a study, list its `trials`, pick the `best` one, `predict` with the exported model.
    """
    quiet_libraries()
    # Backstop for a path we print without shown(): escape what the terminal cannot take, never crash.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")


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
@user_errors
def run(**settings) -> None:
    """Run or resume a study.

    Checks every input, caches the backbone's features once, then trains a head per trial (and with
    --finetune-blocks, fine-tunes the winner), each trial a nested MLflow run.
    """
    cfg = SweepConfig(**settings)
    say = (lambda _: None) if cfg.quiet else click.echo
    result = run_sweep(cfg, say)
    click.echo(format_table(result.ranking.rows()))
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
@user_errors
def trials(study, storage, tracking_uri, sort_by, fmt, tolerance) -> None:
    """List a study's trials (table, CSV or JSON).

    Every trial of both stages with its state, parameters, scores and MLflow run id; the winner starred.
    """
    ranking = rank(read_studies(storage, study), tolerance)
    rows = ranking.rows(sorted(ranking.records, key=SORT_KEYS[sort_by]))
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
