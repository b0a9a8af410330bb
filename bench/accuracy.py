"""`python -m bench.accuracy` (`make bench-accuracy`): each recipe's accuracy on images no trial saw,
and every recipe compared with the default image by image.

The validation split picks the winner, so its val_acc flatters it. Here every recipe runs once per
fold of one stratified 5-fold split of train/ (a sweep file's `holdout_fold: F`; sweep.data.fold_rows
deals the same folds to every recipe), and what `best` would ship from each run (the winner under the
recipe's own rule, run on the image files as `sweep predict` runs the exported model) predicts the
fold that run never saw. So each recipe predicts every training image once, 3,068 predictions, and
two recipes are compared on the same images: the table gives each recipe's accuracy with a 95 %
bootstrap interval over images, and its difference to the default with a paired one (the same
resampled images for both), marked real when it excludes zero. Those intervals hold the trained
models fixed, and a retraining moves a recipe's estimate by about 0.01 (docs/benchmarks.md), so a
recipe is also trained a second time (seed 1: its `, seed 1` twin) and compared with the default
trained twice: each image's difference averaged over both trainings, the images resampled once.

Every recipe is the defaults (`make sweep`) with some options changed. Its stage 1 runs once per
fold (shared by every recipe with the same image size, precision and seed), its stage 2 on a copy
of those stores, so recipes that share a stage 1 differ only in what they add. One feature cache,
of all of train/, serves every fold. Results go to results.jsonl in the work folder, one line per
(recipe, fold) with its held-out predictions, so a run resumes (`--work-dir` again) and the table
prints from whatever is done.

Needs CLOTHING_DATA_DIR and CLOTHING_BACKBONE_WEIGHTS. On a 2-core CPU the first recipe's five folds
take about 20 minutes (the five stage-1 sweeps included), each further recipe of the same image size
14 to 16 minutes; with native bf16 (AVX-512 bf16, AMX) about 10, and 4 to 10. `--front PNG` (`make
bench-accuracy`) also times each recipe cold, as a user waits for it (a fresh cache and stores, all
of train/, `sweep run` then `best --export`), with A, the course notebook's one pass over the images
on the same machine, then prints the front of accuracy against cold time and draws it (bench.front).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np

from bench import cpu_flags
from bench.front import Point, default_recipe, draw_front, front
from bench.notebook import notebook_pass
from clothing.checkpoint import spec_of
from clothing.data import ClothingDataset, build_transforms
from clothing.inference import BatchOptions
from clothing.model import load_backbone
from clothing.scoring import model_from_checkpoint, predicted_right
from sweep.config import HOLDOUT_FOLDS, Stores, SweepConfig, read_sweep_file
from sweep.data import fold_rows
from sweep.pipeline import quiet_libraries
from sweep.study import read_studies
from sweep.tracking import Tracker

RECIPE = SweepConfig()  # the defaults: what every recipe changes


def file_options(path: Path) -> tuple[str, ...]:
    """A sweep file's settings as `run`'s options (a file without a `space`)."""
    settings, _ = read_sweep_file(path)
    return tuple(x for name, value in settings.items() for x in (f"--{name.replace('_', '-')}", str(value)))


FOLDS = tuple(range(1, HOLDOUT_FOLDS + 1))
DEFAULT = "the recipe (make sweep)"

# Every recipe is the defaults (the recommended recipe: `make sweep`) with the options it lists.
STAGE1_ONLY = ("--finetune-blocks", "0")
THOROUGH = "the thorough recipe (sweeps/thorough.yaml)"
SEEDS = ("--seed", "1")  # what a recipe's second training adds to its options
RECIPES = {
    "stage 1 only": STAGE1_ONLY,
    DEFAULT: (),
    THOROUGH: file_options(Path(__file__).resolve().parent.parent / "sweeps" / "thorough.yaml"),
}
# A second training of each (another seed: other stage-1 trials, another stage 2).
RECIPES |= {f"{name.split(' (')[0]}, seed 1": (*options, *SEEDS) for name, options in RECIPES.items()}
# What `make bench-accuracy` (`--front`) runs and draws unless --recipe names others.
FRONT_RECIPES = ("stage 1 only", DEFAULT, THOROUGH)


def stores_in(folder: Path) -> list[str]:
    return ["--storage", f"sqlite:///{folder / 'optuna.db'}", "--tracking-uri", f"sqlite:///{folder / 'mlflow.db'}"]


def run_sweep(folder: Path, cache: Path, options: tuple[str, ...], fold: int | None = None) -> float:
    """One `sweep run` in its own process, as a user runs it (with `fold` of train/ held out, a sweep
    file's setting); returns its wall time."""
    command = [sys.executable, "-m", "sweep", "run", "--quiet"]
    if fold is not None:
        folder.mkdir(parents=True, exist_ok=True)
        held_out = folder / "holdout.yaml"
        held_out.write_text(f"holdout_fold: {fold}\n")
        command += ["--config", str(held_out)]
    env = {**os.environ, "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "false"}
    start = time.perf_counter()
    stores = [*stores_in(folder), "--cache-dir", str(cache)]
    subprocess.run([*command, *options, *stores], check=True, stdout=subprocess.DEVNULL, env=env)
    return time.perf_counter() - start


def option_value(options: tuple[str, ...], name: str, default: str) -> str:
    """The value `options` gives `name` (the last one, as click reads it), else `default`."""
    given = [options[i + 1] for i, option in enumerate(options[:-1]) if option == name]
    return given[-1] if given else default


def fine_tunes(options: tuple[str, ...]) -> bool:
    """Whether the recipe has a stage 2."""
    return int(option_value(options, "--finetune-blocks", str(RECIPE.stage2.finetune_blocks))) > 0


# The options of a recipe that change its stage 1, with the defaults' values: recipes that agree on
# these share one stage-1 sweep per fold.
STAGE1_SETTINGS = {
    "--image-size": str(RECIPE.data.image_size),
    "--precision": RECIPE.data.precision,
    "--seed": str(RECIPE.stage1.seed),
}


def stage1_setting(options: tuple[str, ...], name: str) -> str:
    """The value `options` give one of STAGE1_SETTINGS, else the default's."""
    return option_value(options, name, STAGE1_SETTINGS[name])


def stage1_options(options: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(x for name in STAGE1_SETTINGS for x in (name, stage1_setting(options, name)))


def stage1_key(options: tuple[str, ...]) -> str:
    """The name of the recipe's stage 1: its image size, then whatever else differs from the defaults."""
    values = dict(zip(STAGE1_SETTINGS, stage1_options(options)[1::2], strict=True))
    size = values.pop("--image-size")
    return "-".join([f"size{size}", *(f"{n[2:]}{v}" for n, v in values.items() if v != STAGE1_SETTINGS[n])])


class HeldOutScorer:
    """Predicts a fold's held-out images of train/ with what `best` ships from a run: its winner's
    model, run on the image files as `sweep predict` runs the exported file."""

    def __init__(self, data_dir: Path) -> None:
        self.backbone = load_backbone(os.environ["CLOTHING_BACKBONE_WEIGHTS"])
        self.train = ClothingDataset(data_dir / "train")

    def correct(self, checkpoint: dict, fold: int) -> tuple[np.ndarray, list[int]]:
        """(the fold's rows of train/, 1 for each of their images the checkpoint's model labels right, else 0)."""
        rows = fold_rows(np.asarray(self.train.labels), fold)[1]
        paths, labels = [self.train.image_paths[i] for i in rows], [self.train.labels[i] for i in rows]
        model = model_from_checkpoint(checkpoint, self.backbone)
        return rows, predicted_right(model, spec_of(checkpoint), paths, labels, BatchOptions())


def score_run(scorer: HeldOutScorer, folder: Path, fold: int) -> dict:
    """What `best` ships from the run in `folder` (the winner under the run's own tolerance), and
    which of the fold's held-out images it predicts right."""
    winner = read_studies(Stores(storage=f"sqlite:///{folder / 'optuna.db'}")).rank().winner
    checkpoint = Tracker(f"sqlite:///{folder / 'mlflow.db'}").fetch_checkpoint(winner)
    rows, correct = scorer.correct(checkpoint, fold)
    return {"trial": winner.name, "val_acc": winner.val_acc, "rows": rows.tolist(), "correct": correct}


def bootstrap(values: np.ndarray, resamples: int = 2000) -> tuple[float, float, float]:
    """The mean of per-image `values` and its 95 % percentile-bootstrap interval over images. The
    resampled images depend only on their count, so the intervals of two recipes, and of their
    per-image difference, come from the same draws: the difference's interval is paired."""
    rng, means = np.random.default_rng(0), []
    for start in range(0, resamples, 250):  # in chunks: a (resamples x images) index would be large
        draws = rng.integers(0, len(values), size=(min(250, resamples - start), len(values)))
        means.append(values[draws].mean(axis=1))
    low, high = np.percentile(np.concatenate(means), [2.5, 97.5])
    return float(values.mean()), float(low), float(high)


def per_image(results: list[dict], recipe: str, views: int) -> np.ndarray | None:
    """`recipe`'s right (1.0) and wrong (0.0) over every held-out image, by row of train/; None until
    all its folds are done."""
    runs = {r["fold"]: r for r in results if r["recipe"] == recipe and r["views"] == views}
    if set(runs) != set(FOLDS):
        return None
    rows = np.concatenate([runs[f]["rows"] for f in FOLDS])
    correct = np.concatenate([runs[f]["correct"] for f in FOLDS])
    return correct[np.argsort(rows)].astype(float)


def interval(mean: float, low: float, high: float, signed: bool = False) -> str:
    sign = "+" if signed else ""
    return f"{mean:{sign}.3f} [{low:{sign}.3f}, {high:{sign}.3f}]"


def baseline(name: str) -> str:
    """What `name` is compared with, image by image: the default trained with the same seed (the
    default trained again, with the default itself: the difference a retraining makes)."""
    options = (*RECIPES[DEFAULT], "--seed", stage1_setting(RECIPES[name], "--seed"))
    same_seed = next((n for n, given in RECIPES.items() if given == options), DEFAULT)
    return DEFAULT if name == same_seed else same_seed


def retrained(name: str) -> str | None:
    """The recipe `name` trained again with another seed, if the bench has one (SEEDS)."""
    return next((n for n, options in RECIPES.items() if options == (*RECIPES[name], *SEEDS)), None)


def paired(scores: dict[str, np.ndarray], trainings: list[str]) -> str:
    """The difference of these recipes (one recipe, or its trainings) to their baselines, image by
    image: "mean [95 % CI] | whether the interval excludes zero". Each image's difference is averaged
    over the trainings, and the images are resampled once for all of them: an image counts once
    however often it was trained on, so a second training that copies the first leaves the interval
    as it was (joining both trainings' differences into one vector of 2N and resampling its entries
    one by one made it about 1/sqrt(2) too narrow)."""
    differences = np.mean([scores[n] - scores[baseline(n)] for n in trainings], axis=0)
    mean, low, high = bootstrap(differences)
    return f"{interval(mean, low, high, signed=True)} | {'yes' if low > 0 or high < 0 else 'no'}"


def print_table(results: list[dict], views: int) -> None:
    """Each recipe whose folds are all done: accuracy, difference to the default of its seed (paired),
    and what its runs were like; then each recipe trained twice against the default trained twice."""
    click.echo(
        "| recipe | k-fold accuracy [95 % CI] | minus the default (same seed), paired [95 % CI] | real? "
        "| val_acc of the winners | stage 2 won | warm time per fold |"
    )
    click.echo("| --- | --- | --- | --- | --- | --- | --- |")
    names = [n for n in dict.fromkeys(r["recipe"] for r in results if r["views"] == views) if n in RECIPES]
    scores = {n: per_image(results, n, views) for n in names}
    scores = {n: correct for n, correct in scores.items() if correct is not None}  # all folds done
    for name, correct in scores.items():
        runs = [r for r in results if r["recipe"] == name and r["views"] == views]
        stage2 = sum(r["trial"].startswith("finetune") for r in runs)
        compared = name != baseline(name) and baseline(name) in scores
        click.echo(
            f"| {name} | {interval(*bootstrap(correct))} | {paired(scores, [name]) if compared else '- | -'} "
            f"| {statistics.mean(r['val_acc'] for r in runs):.3f} | {stage2} of {len(runs)} "
            f"| {statistics.mean(r['seconds'] for r in runs):.0f} s |"
        )
    click.echo(f"\n{len(FOLDS)} folds, every training image predicted once per recipe; CPU flags: {cpu_flags()}")
    # Two trainings of each: the paired differences of both, so the interval also sees a retrained fold.
    twice = [[n, retrained(n)] for n in scores if n != DEFAULT and retrained(n) in scores]
    if twice and retrained(DEFAULT) in scores:
        click.echo(
            "\n| recipe, trained twice (seeds 42, 1) | minus the default trained twice, paired [95 % CI] | real? "
            "| seed 42 alone | seed 1 alone |"
        )
        click.echo("| --- | --- | --- | --- | --- |")
        for trainings in twice:
            each = " | ".join(paired(scores, [n]).split(" | ")[0] for n in trainings)
            click.echo(f"| {trainings[0]} | {paired(scores, trainings)} | {each} |")


def run_folder(root: Path, name: str, views: int, fold: int) -> Path:
    return root / f"{name.replace(' ', '_').replace('/', '-')}-views{views}-fold{fold}"


def held_out_runs(root: Path, names: tuple[str, ...], views: int, done: list[dict]) -> None:
    """Each recipe once per fold, unless `done` has it: its stage 1 (shared by every recipe at that
    image size), then its own run on a copy of those stores, scored; appended to `done` and to
    results.jsonl."""
    cache, scorer = root / "cache", HeldOutScorer(Path(os.environ["CLOTHING_DATA_DIR"]))
    for name in names:
        for fold in FOLDS:
            if any(r["recipe"] == name and r["fold"] == fold and r["views"] == views for r in done):
                continue
            base = root / f"stage1-views{views}-{stage1_key(RECIPES[name])}-fold{fold}"
            if not (base / "optuna.db").exists():
                options = (*STAGE1_ONLY, "--views", str(views), *stage1_options(RECIPES[name]))
                (base / "seconds").write_text(f"{run_sweep(base, cache, options, fold)}")
            folder = run_folder(root, name, views, fold)
            shutil.rmtree(folder, ignore_errors=True)
            shutil.copytree(base, folder)
            seconds = run_sweep(folder, cache, (*RECIPES[name], "--views", str(views)), fold)
            if not fine_tunes(RECIPES[name]):  # stage 1 only: the base's own time
                seconds = float((base / "seconds").read_text())
            result = {"recipe": name, "fold": fold, "views": views, "seconds": seconds}
            result |= score_run(scorer, folder, fold)
            done.append(result)
            with (root / "results.jsonl").open("a") as out:
                out.write(json.dumps(result) + "\n")
            click.echo(f"{name}, fold {fold}: {statistics.mean(result['correct']):.3f} ({result['trial']})")


def export_seconds(folder: Path) -> float:
    """`sweep best --export`, the second half of `make sweep`, in its own process; its wall time."""
    command = [sys.executable, "-m", "sweep", "best", "--export", str(folder / "model.pt"), *stores_in(folder)]
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def notebook_pass_seconds(data_dir: Path) -> float:
    """A: the course notebook's one pass of the backbone over train/ and validation/ (bench's A)."""
    backbone = load_backbone(os.environ["CLOTHING_BACKBONE_WEIGHTS"])
    train = ClothingDataset(data_dir / "train", build_transforms())
    val = ClothingDataset(data_dir / "validation", build_transforms(), train.class_to_idx)
    return notebook_pass({"train": train, "val": val}, backbone)[1]


def time_cold(root: Path, names: tuple[str, ...], views: int) -> None:
    """A (once), then each recipe as `make sweep` runs it from nothing (fresh stores and cache, all of
    train/): `sweep run` + `best --export`, each in its own process. One line each in cold.jsonl."""
    a = notebook_pass_seconds(Path(os.environ["CLOTHING_DATA_DIR"]))
    click.echo(f"A (the notebook's pass over train/ and validation/): {a:.1f} s")
    for name in names:
        folder = Path(tempfile.mkdtemp(prefix="cold-", dir=root))
        run = run_sweep(folder, folder / "cache", (*RECIPES[name], "--views", str(views)))
        export = export_seconds(folder)
        row = {"recipe": name, "views": views, "seconds": run + export, "run": run, "export": export, "a_seconds": a}
        row |= {"cpu_flags": cpu_flags(), "date": time.strftime("%Y-%m-%d")}
        with (root / "cold.jsonl").open("a") as out:
            out.write(json.dumps(row) + "\n")
        click.echo(json.dumps(row))
        shutil.rmtree(folder)


def print_front(results: list[dict], cold: list[dict], views: int, picture: Path) -> None:
    """Each recipe with all its folds and a cold time: accuracy [95 % CI] against cold time, the
    front, and the default the rule picks."""
    cold = [c for c in cold if c["views"] == views]
    points = []
    for name in dict.fromkeys(c["recipe"] for c in cold):
        correct = per_image(results, name, views)
        if correct is not None:
            seconds = statistics.mean(c["seconds"] for c in cold if c["recipe"] == name)
            points.append(Point(name, *bootstrap(correct), seconds))
    if not points:
        raise click.ClickException("no recipe has both all its folds and a cold time yet")
    a = statistics.mean(c["a_seconds"] for c in cold)
    on_front, chosen = front(points), default_recipe(points, a)
    click.echo("| recipe | k-fold accuracy [95 % CI] | cold time | cold / A | front |")
    click.echo("| --- | --- | --- | --- | --- |")
    for p in sorted(points, key=lambda p: p.seconds):
        mark = "**default**" if p == chosen else ("yes" if p in on_front else "")
        click.echo(
            f"| {p.recipe} | {interval(p.accuracy, p.low, p.high)} | {p.seconds:.0f} s | {p.seconds / a:.2f} | {mark} |"
        )
    click.echo(f"\nA = {a:.0f} s; default by the rule: {chosen.recipe if chosen else 'none fits in A'}")
    title = f"{views} views, {HOLDOUT_FOLDS}-fold, {cold[0]['date']}, CPU flags: {cold[0]['cpu_flags']}"
    click.echo(f"picture: {draw_front(points, a, title, picture)}")


def read_lines(path: Path) -> list[dict]:
    """The JSON lines the runs so far appended (results.jsonl, cold.jsonl)."""
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@click.command()
@click.option("--work-dir", type=click.Path(path_type=Path), default=None, help="Keep stores and results here.")
@click.option("--recipe", "recipes", multiple=True, type=click.Choice(list(RECIPES)), help="Only these (repeatable).")
@click.option("--views", default=RECIPE.data.views, show_default=True, help="Cached views per training image.")
@click.option(
    "--front",
    "picture",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also time each recipe cold (those the work folder lacks), print the front and draw it into this PNG.",
)
def main(work_dir: Path | None, recipes: tuple[str, ...], views: int, picture: Path | None) -> None:
    if not (os.environ.get("CLOTHING_DATA_DIR") and os.environ.get("CLOTHING_BACKBONE_WEIGHTS")):
        raise click.ClickException("set CLOTHING_DATA_DIR and CLOTHING_BACKBONE_WEIGHTS to the real data and weights")
    quiet_libraries()
    root = work_dir or Path(tempfile.mkdtemp(prefix="bench-accuracy-"))
    root.mkdir(parents=True, exist_ok=True)
    names = tuple(dict.fromkeys((DEFAULT, *(recipes or (FRONT_RECIPES if picture else RECIPES)))))
    done = read_lines(root / "results.jsonl")
    held_out_runs(root, names, views, done)
    shown = {*names, *map(retrained, names)}  # and their second trainings, where done
    print_table([r for r in done if r["recipe"] in shown], views)
    if picture is None:
        click.echo(f"stores in {root}")
        return
    timed_already = {c["recipe"] for c in read_lines(root / "cold.jsonl") if c["views"] == views}
    missing = [n for n in names if n not in timed_already]
    if missing:
        time_cold(root, tuple(missing), views)
    timed = [c for c in read_lines(root / "cold.jsonl") if c["recipe"] in names]
    print_front(done, timed, views, picture)


if __name__ == "__main__":
    main()
