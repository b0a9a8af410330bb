"""`python -m bench.accuracy` (`make bench-accuracy`): each recipe's accuracy on images no trial saw.

The validation split picks the winner, so its val_acc flatters it. Every recipe here runs once per
seed with a stratified 10 % of train/ held out (a sweep file's `holdout: 0.1` and `holdout_seed: S`,
seeds 0, 1, 2; sweep.data.holdout_rows), and the table gives, per recipe: the winner's val_acc, the
winner's accuracy on the held-out images (mean ± std over the seeds) under the plain sweep's band
(0.02) and the recipe's (0.01), and for the trial with the best val_acc (does the gap rule pick models
that generalise better?), and the mean time of a warm run (stage 1 or stage 2).

Every recipe is the defaults (`make sweep`) with some options changed. Its stage 1 (views and image
size as given) runs once per seed; its stage 2 then starts from a copy of those stores, so recipes
that share a stage 1 differ only in what they add. One feature cache serves all: it holds every
training image.
Results go to results.jsonl in the work folder, one line per (recipe, seed), so a run can be resumed
(`--work-dir` again) and the table printed from whatever is done.

Needs CLOTHING_DATA_DIR and CLOTHING_BACKBONE_WEIGHTS. Every recipe at one --views is about 80
minutes on a 2-core CPU (a 3-block stage 2 about 2 minutes a seed); --recipe picks some. The cold
time of a recipe, as a user waits for it, is measured with `--cold RECIPE` (a fresh cache and
stores, all of train/, `sweep run` then `best --export`), together with A, the course notebook's
one pass over the images on the same machine.

`make bench-accuracy` (`--views 2 --front PNG`) is the front of held-out accuracy against cold time
(bench.front): it runs the held-out seeds and the cold time of each of FRONT_RECIPES that its work
folder lacks, then prints the table, marks the front and the default the rule picks, and draws it.
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

from bench import cpu_flags
from bench.front import Point, default_recipe, draw_front, front
from bench.notebook import notebook_pass
from clothing.data import ClothingDataset, build_transforms
from clothing.extract import ExtractionOptions
from clothing.features import FeatureSet, cached_features
from clothing.model import finetune_cut, load_backbone
from clothing.predict import mirror_tta
from clothing.scoring import cached_logits, model_from_checkpoint
from sweep.config import Stores, SweepConfig
from sweep.data import holdout_rows
from sweep.pipeline import quiet_libraries
from sweep.ranking import select_winner
from sweep.study import read_studies
from sweep.tracking import Tracker

HOLDOUT_FRACTION, HOLDOUT_SEEDS = 0.1, (0, 1, 2)  # 10 % of train/ held out, three draws
RECIPE = SweepConfig()  # the defaults: what every recipe changes

# Every recipe is the defaults (the recommended recipe: `make sweep`) with the options it lists.
TOLERANCES = (0.02, 0.01)  # the plain sweep's band, and the recipe's
STAGE1_ONLY = ("--finetune-blocks", "0")
RECIPES = {
    "stage 1 only": STAGE1_ONLY,
    "stage 1 only at 288 px": (*STAGE1_ONLY, "--image-size", "288"),
    "the recipe at 224 px": ("--image-size", "224"),
    "the recipe (make sweep)": (),
    "the recipe at 288 px": ("--image-size", "288"),
    "the recipe, patience 2": ("--finetune-patience", "2"),
    "the recipe, 6 fixed epochs": ("--finetune-patience", "0"),
    "1 block, lr 3e-5, 10 epochs": ("--finetune-blocks", "1", "--finetune-lr", "3e-5", "--finetune-epochs", "10"),
    "3 blocks, lr 3e-5, 10 epochs": ("--finetune-lr", "3e-5", "--finetune-epochs", "10"),
}
# What `make bench-accuracy` (`--front`) runs and draws: the recipes of the front.
FRONT_RECIPES = (
    "stage 1 only",
    "stage 1 only at 288 px",
    "the recipe at 224 px",
    "the recipe (make sweep)",
    "the recipe at 288 px",
)


def stores_in(folder: Path, cache: Path) -> list[str]:
    return [
        *("--storage", f"sqlite:///{folder / 'optuna.db'}"),
        *("--tracking-uri", f"sqlite:///{folder / 'mlflow.db'}"),
        *("--cache-dir", str(cache)),
    ]


def run_sweep(folder: Path, cache: Path, options: tuple[str, ...], holdout_seed: int | None = None) -> float:
    """One `sweep run` in its own process, as a user runs it (with the held-out part of `holdout_seed`,
    a sweep file's setting); returns its wall time."""
    command = [sys.executable, "-m", "sweep", "run", "--quiet"]
    if holdout_seed is not None:
        folder.mkdir(parents=True, exist_ok=True)
        held_out = folder / "holdout.yaml"
        held_out.write_text(f"holdout: {HOLDOUT_FRACTION}\nholdout_seed: {holdout_seed}\n")
        command += ["--config", str(held_out)]
    env = {**os.environ, "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "false"}
    start = time.perf_counter()
    subprocess.run([*command, *options, *stores_in(folder, cache)], check=True, stdout=subprocess.DEVNULL, env=env)
    return time.perf_counter() - start


def option_value(options: tuple[str, ...], name: str, default: str) -> str:
    """The value `options` gives `name` (the last one, as click reads it), else `default`."""
    given = [options[i + 1] for i, option in enumerate(options[:-1]) if option == name]
    return given[-1] if given else default


def deepest_cut(options: tuple[str, ...]) -> int | None:
    blocks = int(option_value(options, "--finetune-blocks", str(RECIPE.stage2.finetune_blocks)))
    return finetune_cut(blocks) if blocks else None


def image_size(options: tuple[str, ...]) -> int:
    return int(option_value(options, "--image-size", str(RECIPE.data.image_size)))


class HeldOutScorer:
    """Scores a trial's checkpoint on the held-out rows of train/, from the feature cache the sweep
    filled (all of train/), exactly as `best` scores a test/ split."""

    def __init__(self, data_dir: Path, cache: Path, views: int) -> None:
        self.backbone = load_backbone(os.environ["CLOTHING_BACKBONE_WEIGHTS"])
        self.data_dir, self.cache, self.views = data_dir, cache, views

    def held_out(self, seed: int, cut: int | None, size: int) -> FeatureSet:
        """The held-out rows of seed `seed`, read once per run from the cache the sweep filled."""
        train = ClothingDataset(self.data_dir / "train", build_transforms(size))
        options = ExtractionOptions(precision="auto", views=self.views, cut=cut, image_size=size, progress=False)
        full = cached_features(train, self.backbone, self.cache, options)
        return full.subset(holdout_rows(full.labels, HOLDOUT_FRACTION, seed)[1])

    def accuracy(self, checkpoint: dict, part: FeatureSet) -> tuple[float, float]:
        """(held-out accuracy, the same with mirror TTA) of a checkpoint: the plain view's logits, then
        their mean with the mirror view's (cached view 1, the image flipped after resizing, as `best
        --tta` does)."""
        model = model_from_checkpoint(checkpoint, self.backbone)
        plain = cached_logits(model, part)
        tta = mirror_tta(lambda mirrored: cached_logits(model, part, int(mirrored)))
        return tuple((logits.argmax(dim=1) == part.labels).float().mean().item() for logits in (plain, tta))


def score_run(scorer: HeldOutScorer, folder: Path, seed: int, options: tuple[str, ...]) -> dict:
    """Held-out accuracy (and with mirror TTA) of the winner (the default rule, and a narrower band)
    and of the best val_acc; a trial several rules chose is scored once."""
    records = read_studies(Stores(storage=f"sqlite:///{folder / 'optuna.db'}")).records()
    tracker = Tracker(f"sqlite:///{folder / 'mlflow.db'}")
    chosen = {f"tolerance {t:g}": select_winner(records, t) for t in TOLERANCES}
    chosen["max val_acc"] = max((r for r in records if r.state == "COMPLETE"), key=lambda r: (r.val_acc, -r.number))
    part = scorer.held_out(seed, deepest_cut(options), image_size(options))
    scores = {}
    for record in {r.name: r for r in chosen.values()}.values():
        plain, tta = scorer.accuracy(tracker.fetch_checkpoint(record), part)
        scores[record.name] = {"trial": record.name, "val_acc": record.val_acc, "held_out": plain, "held_out_tta": tta}
    return {rule: scores[r.name] for rule, r in chosen.items()}


def mean_std(values: list[float | None]) -> str:
    if None in values:
        return "-"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {spread:.3f}"


def stage2_wins(rows: list[dict]) -> str:
    """On how many seeds the winner at make sweep's band is a stage-2 trial: is the choice stable?"""
    wins = sum(r["scores"][FRONT_RULE]["trial"].startswith("finetune") for r in rows)
    return f"{wins} of {len(rows)}"


def print_table(results: list[dict]) -> None:
    click.echo(
        "| recipe | seeds | held-out (winner) | val_acc (winner) | held-out (winner, tolerance 0.01) "
        "| the same with mirror TTA | stage 2 won at 0.01 "
        "| held-out (max-val_acc trial) | warm time |"
    )
    click.echo("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in dict.fromkeys(r["recipe"] for r in results):
        rows = [r for r in results if r["recipe"] == name]

        def column(rule: str, key: str = "held_out", rows=rows) -> str:
            return mean_std([r["scores"][rule].get(key) for r in rows])

        click.echo(
            f"| {name} | {len(rows)} | {column('tolerance 0.02')} | {column('tolerance 0.02', 'val_acc')} "
            f"| {column(FRONT_RULE)} | {column(FRONT_RULE, 'held_out_tta')} "
            f"| {stage2_wins(rows)} | {column('max val_acc')} "
            f"| {statistics.mean(r['seconds'] for r in rows):.0f} s |"
        )


def run_folder(root: Path, name: str, views: int, seed: int) -> Path:
    return root / f"{name.replace(' ', '_').replace('/', '-')}-views{views}-seed{seed}"


def export_seconds(folder: Path, cache: Path) -> float:
    """`sweep best --export`, the second half of `make sweep`, in its own process; its wall time."""
    command = [sys.executable, "-m", "sweep", "best", "--export", str(folder / "model.pt"), *stores_in(folder, cache)]
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
        export = export_seconds(folder, folder / "cache")
        row = {"recipe": name, "views": views, "seconds": run + export, "run": run, "export": export, "a_seconds": a}
        row |= {"cpu_flags": cpu_flags(), "date": time.strftime("%Y-%m-%d")}
        with (root / "cold.jsonl").open("a") as out:
            out.write(json.dumps(row) + "\n")
        click.echo(json.dumps(row))
        shutil.rmtree(folder)


FRONT_RULE = "tolerance 0.01"  # the winner the front scores: `make sweep`'s band


def shipped_score(result: dict, tta: bool = False) -> float | None:
    """The held-out accuracy of what `best --export` ships for the recipe's winner (None: a result
    from before TTA was scored)."""
    return result["scores"][FRONT_RULE].get("held_out" + ("_tta" if tta else ""))


def runs_of(results: list[dict], recipe: str, views: int) -> list[dict]:
    """The held-out runs (one per seed) of `recipe` at `views`."""
    return [r for r in results if r["recipe"] == recipe and r["views"] == views]


def front_points(results: list[dict], cold: list[dict], views: int) -> tuple[list[Point], float]:
    """Each recipe with both a held-out estimate and a cold time at `views`, and the A measured with
    the cold times (the mean, if several runs measured it)."""
    cold = [c for c in cold if c["views"] == views]
    points = []
    for name in dict.fromkeys(r["recipe"] for r in results if r["views"] == views):
        scores = [shipped_score(r) for r in runs_of(results, name, views)]
        times = [c["seconds"] for c in cold if c["recipe"] == name]
        if len(scores) > 1 and times:
            points.append(Point(name, statistics.mean(scores), statistics.stdev(scores), statistics.mean(times)))
    return points, statistics.mean(c["a_seconds"] for c in cold) if cold else float("nan")


def print_front(results: list[dict], cold: list[dict], views: int, picture: Path) -> None:
    points, a = front_points(results, cold, views)
    if not points:
        raise click.ClickException("no recipe has both held-out runs and a cold time yet (--cold RECIPE)")
    on_front, chosen = front(points), default_recipe(points, a)
    tta = {p.recipe: mean_std([shipped_score(r, tta=True) for r in runs_of(results, p.recipe, views)]) for p in points}
    wins = {p.recipe: stage2_wins(runs_of(results, p.recipe, views)) for p in points}
    click.echo(
        "| recipe | held-out, what `best` ships at 0.01 (3 seeds) | with mirror TTA | stage 2 won "
        "| cold time | cold / A | front |"
    )
    click.echo("| --- | --- | --- | --- | --- | --- | --- |")
    for p in sorted(points, key=lambda p: p.seconds):
        mark = "**default**" if p == chosen else ("yes" if p in on_front else "")
        click.echo(
            f"| {p.recipe} | {p.accuracy:.3f} ± {p.spread:.3f} | {tta[p.recipe]} | {wins[p.recipe]} "
            f"| {p.seconds:.0f} s | {p.seconds / a:.2f} | {mark} |"
        )
    click.echo(
        f"\nA = {a:.0f} s; CPU flags: {cold[0]['cpu_flags']}; "
        f"default by the rule: {chosen.recipe if chosen else 'none fits in A'}"
    )
    title = f"{views} views, {cold[0]['date']}, CPU flags: {cold[0]['cpu_flags']}"
    click.echo(f"picture: {draw_front(points, a, title, picture)}")


@click.command()
@click.option("--work-dir", type=click.Path(path_type=Path), default=None, help="Keep stores and results here.")
@click.option("--recipe", "recipes", multiple=True, type=click.Choice(list(RECIPES)), help="Only these (repeatable).")
@click.option("--views", default=2, show_default=True, help="Cached views per training image (stage 1 and 2).")
@click.option(
    "--cold", multiple=True, type=click.Choice(list(RECIPES)), help="Time these recipes cold (and A) instead."
)
@click.option("--rescore", is_flag=True, help="Only score the runs in --work-dir again and print the tables.")
@click.option(
    "--front",
    "picture",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="The front: run what it still lacks (the held-out runs and cold times of FRONT_RECIPES, or of "
    "--recipe), print it and draw it into this PNG.",
)
def main(  # noqa: PLR0913 - its options
    work_dir: Path | None, recipes: tuple[str, ...], views: int, cold: tuple[str, ...], rescore: bool, picture
) -> None:
    if not (os.environ.get("CLOTHING_DATA_DIR") and os.environ.get("CLOTHING_BACKBONE_WEIGHTS")):
        raise click.ClickException("set CLOTHING_DATA_DIR and CLOTHING_BACKBONE_WEIGHTS to the real data and weights")
    quiet_libraries()
    root = work_dir or Path(tempfile.mkdtemp(prefix="bench-accuracy-"))
    root.mkdir(parents=True, exist_ok=True)
    if cold:
        time_cold(root, cold, views)
        return
    results_file = root / "results.jsonl"
    done = read_lines(results_file)
    if rescore:  # the scores again, from the stores each run left (e.g. after adding a rule here)
        scorer = HeldOutScorer(Path(os.environ["CLOTHING_DATA_DIR"]), root / "cache", views)
        for result in done:
            folder = run_folder(root, result["recipe"], result["views"], result["seed"])
            scorer.views = result["views"]
            result["scores"] = score_run(scorer, folder, result["seed"], RECIPES[result["recipe"]])
        results_file.write_text("".join(json.dumps(r) + "\n" for r in done))
        for each in sorted({r["views"] for r in done}):
            click.echo(f"\nviews {each}:")
            print_table([r for r in done if r["views"] == each])
        return
    names = recipes or (FRONT_RECIPES if picture is not None else tuple(RECIPES))
    held_out_runs(root, names, views, done)
    if picture is None:
        print_table([r for r in done if r["views"] == views])
        click.echo(f"\nstores in {root}; CPU flags: {cpu_flags()}")
        return
    # The front: each recipe's cold time too (measured once; `--cold` measures it again), then the table.
    timed_already = {c["recipe"] for c in read_lines(root / "cold.jsonl") if c["views"] == views}
    missing = [n for n in names if n not in timed_already]
    if missing:
        time_cold(root, tuple(missing), views)
    timed = [c for c in read_lines(root / "cold.jsonl") if c["recipe"] in names]
    print_front([r for r in done if r["recipe"] in names], timed, views, picture)


def read_lines(path: Path) -> list[dict]:
    """The JSON lines the runs so far appended (results.jsonl, cold.jsonl)."""
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def held_out_runs(root: Path, names: tuple[str, ...], views: int, done: list[dict]) -> None:
    """Each recipe once per held-out seed, unless `done` has it: its stage 1 (shared by every recipe
    at that image size), then its own run on a copy of those stores, scored; appended to `done` and to
    results.jsonl."""
    cache, scorer = root / "cache", HeldOutScorer(Path(os.environ["CLOTHING_DATA_DIR"]), root / "cache", views)
    for name in names:
        for seed in HOLDOUT_SEEDS:
            if any(r["recipe"] == name and r["seed"] == seed and r["views"] == views for r in done):
                continue
            size = image_size(RECIPES[name])
            base = root / f"stage1-views{views}-size{size}-seed{seed}"
            if not (base / "optuna.db").exists():
                options = (*STAGE1_ONLY, "--views", str(views), "--image-size", str(size))
                (base / "seconds").write_text(f"{run_sweep(base, cache, options, seed)}")
            folder = run_folder(root, name, views, seed)
            shutil.rmtree(folder, ignore_errors=True)
            shutil.copytree(base, folder)
            seconds = run_sweep(folder, cache, (*RECIPES[name], "--views", str(views)), seed)
            if deepest_cut(RECIPES[name]) is None:  # stage 1 only: the base's own time
                seconds = float((base / "seconds").read_text())
            result = {"recipe": name, "seed": seed, "views": views, "seconds": seconds}
            result["scores"] = score_run(scorer, folder, seed, RECIPES[name])
            done.append(result)
            with (root / "results.jsonl").open("a") as out:
                out.write(json.dumps(result) + "\n")
            click.echo(json.dumps(result))


if __name__ == "__main__":
    main()
