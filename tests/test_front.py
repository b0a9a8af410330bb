"""bench-accuracy's instrument: per-image k-fold predictions, paired intervals, the front and the rule
that picks the default recipe from it."""

import numpy as np

from bench.accuracy import (
    DEFAULT,
    FOLDS,
    RECIPES,
    THOROUGH,
    baseline,
    bootstrap,
    paired,
    per_image,
    print_table,
    retrained,
)
from bench.front import Point, default_recipe, draw_front, front
from sweep.data import fold_rows

CHEAP = Point("cheap", 0.85, 0.84, 0.86, 100)
MIDDLE = Point("middle", 0.87, 0.86, 0.88, 150)
SLOW_WORSE = Point("slow and worse", 0.86, 0.85, 0.87, 200)  # dominated by MIDDLE
BEST = Point("best", 0.88, 0.86, 0.90, 300)
TIED_SLOWER = Point("tied, slower", 0.87, 0.86, 0.88, 160)  # as accurate as MIDDLE, dearer: dominated


def test_the_front_keeps_what_nothing_beats_on_both_axes():
    assert front([BEST, SLOW_WORSE, CHEAP, MIDDLE, TIED_SLOWER]) == [CHEAP, MIDDLE, BEST]


def test_the_default_is_the_most_accurate_fitting_recipe_or_a_cheaper_one_within_its_interval():
    points = [CHEAP, MIDDLE, SLOW_WORSE, BEST]
    assert default_recipe(points, budget_seconds=150) == MIDDLE  # BEST does not fit
    # BEST fits, and MIDDLE is within BEST's interval (0.87 >= 0.86): the cheaper wins.
    assert default_recipe(points, budget_seconds=300) == MIDDLE
    sharp = Point("best, tight", 0.88, 0.875, 0.885, 300)
    assert default_recipe([CHEAP, MIDDLE, sharp], budget_seconds=300) == sharp
    assert default_recipe(points, budget_seconds=50) is None


def test_the_picture_is_written(tmp_path):
    path = draw_front([CHEAP, MIDDLE, BEST], 150, "test", tmp_path / "front.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def fold_results(recipe: str, correct: np.ndarray, labels: np.ndarray, folds=FOLDS) -> list[dict]:
    """results.jsonl lines of `recipe`: each fold's held-out rows and whether each was right."""
    lines = []
    for fold in folds:
        rows = fold_rows(labels, fold)[1]
        lines.append(
            {"recipe": recipe, "views": 2, "fold": fold, "rows": rows.tolist(), "correct": correct[rows].tolist()}
        )
    return lines


def test_each_recipe_predicts_every_image_once_and_is_compared_image_by_image():
    labels = np.repeat(np.arange(10), 300)  # 3,000 images, as many as train/
    rng = np.random.default_rng(1)
    default = (rng.random(3000) < 0.87).astype(int)
    better = default.copy()
    better[np.flatnonzero(default == 0)[:45]] = 1  # right on 45 more images (+0.015), wrong on none more
    results = fold_results(DEFAULT, default, labels) + fold_results("better", better, labels)
    results += fold_results("unfinished", default, labels, folds=FOLDS[:-1])

    assert np.array_equal(per_image(results, DEFAULT, 2), default)  # every image, in the order of train/
    assert per_image(results, "unfinished", 2) is None  # a recipe is scored once all its folds are done

    accuracy, low, high = bootstrap(default.astype(float))
    assert accuracy == default.mean() and low < accuracy < high
    assert 0.02 < high - low < 0.03  # about ± 1.96 * sqrt(0.87 * 0.13 / 3000)
    # Paired: the images both get right or wrong cancel, so +0.015 on 3,000 images is real ...
    difference, low, high = bootstrap(per_image(results, "better", 2) - default.astype(float))
    assert abs(difference - 0.015) < 1e-9 and 0 < low < difference < high
    # ... though the two recipes' own intervals overlap.
    assert bootstrap(better.astype(float))[1] < bootstrap(default.astype(float))[2]
    assert bootstrap(default.astype(float) - default) == (0.0, 0.0, 0.0)


def test_a_recipe_is_compared_with_the_default_of_its_own_seed_and_over_both_trainings(capsys):
    # sweeps/thorough.yaml's settings, read from it
    assert RECIPES[THOROUGH] == ("--finetune-blocks", "10", "--finetune-epochs", "3")
    again = retrained(THOROUGH)
    assert RECIPES[again] == (*RECIPES[THOROUGH], "--seed", "1") and baseline(again) == retrained(DEFAULT)
    assert baseline(THOROUGH) == DEFAULT and baseline(retrained(DEFAULT)) == DEFAULT  # a retraining's own change
    labels = np.repeat(np.arange(10), 300)
    right = {name: (np.random.default_rng(i).random(3000) < 0.87).astype(int) for i, name in enumerate(RECIPES)}
    right[THOROUGH] = right[DEFAULT] | (np.arange(3000) % 10 == 0)  # right on every 10th image too
    right[again] = right[retrained(DEFAULT)].copy()  # no better with seed 1
    results = [
        line
        for name in (DEFAULT, THOROUGH, retrained(DEFAULT), again)
        for line in fold_results(name, right[name], labels)
    ]
    for line in results:
        line |= {"trial": "finetune-000", "val_acc": 0.9, "seconds": 1.0}

    print_table(results, views=2)
    lines = capsys.readouterr().out.splitlines()
    main, twice = [line for line in lines if line.startswith(f"| {THOROUGH} |")]  # its row in each table
    gain = (right[THOROUGH] - right[DEFAULT]).mean()
    assert main.startswith(f"| {THOROUGH} | {right[THOROUGH].mean():.3f} [") and f"| {gain:+.3f} [" in main
    assert "| yes |" in main  # paired with the default trained with the same seed
    (again_row,) = [line for line in lines if line.startswith(f"| {again} |")]
    assert "| +0.000 [+0.000, +0.000] | no |" in again_row  # with seed 1's default, not seed 42's
    both = np.concatenate([right[THOROUGH] - right[DEFAULT], right[again] - right[retrained(DEFAULT)]])
    assert twice.startswith(f"| {THOROUGH} | {both.mean():+.3f} [") and abs(both.mean() - gain / 2) < 1e-9
    # Beside it, each training's own difference: seed 42's gain, and none with seed 1.
    assert twice.endswith(f"| {paired(scores_of(right), [THOROUGH]).split(' | ')[0]} | +0.000 [+0.000, +0.000] |")


def scores_of(right: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {name: correct.astype(float) for name, correct in right.items()}


def test_a_second_training_that_copies_the_first_leaves_the_interval_as_it_was():
    """Images are resampled once for both trainings: a copy adds no images, so no certainty. (Joining
    both trainings' differences into one vector of 2N, resampled entry by entry, narrowed it by about
    1/sqrt(2).)"""
    rng = np.random.default_rng(3)
    right = {name: (rng.random(3000) < 0.87).astype(int) for name in RECIPES}
    right[THOROUGH] = np.where(rng.random(3000) < 0.1, 1, right[DEFAULT])  # a few more right
    copies = right | {retrained(THOROUGH): right[THOROUGH], retrained(DEFAULT): right[DEFAULT]}
    once, twice = paired(scores_of(copies), [THOROUGH]), paired(scores_of(copies), [THOROUGH, retrained(THOROUGH)])
    assert twice == once
