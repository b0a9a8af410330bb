"""bench-accuracy's front and the rule that picks the default recipe from it."""

from bench.front import Point, default_recipe, draw_front, front

CHEAP = Point("cheap", 0.85, 0.01, 100)
MIDDLE = Point("middle", 0.87, 0.01, 150)
SLOW_WORSE = Point("slow and worse", 0.86, 0.01, 200)  # dominated by MIDDLE
BEST = Point("best", 0.88, 0.02, 300)
TIED_SLOWER = Point("tied, slower", 0.87, 0.01, 160)  # as accurate as MIDDLE, dearer: dominated


def test_the_front_keeps_what_nothing_beats_on_both_axes():
    assert front([BEST, SLOW_WORSE, CHEAP, MIDDLE, TIED_SLOWER]) == [CHEAP, MIDDLE, BEST]


def test_the_default_is_the_most_accurate_fitting_recipe_or_a_cheaper_one_within_its_spread():
    points = [CHEAP, MIDDLE, SLOW_WORSE, BEST]
    assert default_recipe(points, budget_seconds=150) == MIDDLE  # BEST does not fit
    # BEST fits, and MIDDLE is within BEST's standard deviation (0.87 >= 0.88 - 0.02): the cheaper wins.
    assert default_recipe(points, budget_seconds=300) == MIDDLE
    sharp = Point("best, tight", 0.88, 0.005, 300)
    assert default_recipe([CHEAP, MIDDLE, sharp], budget_seconds=300) == sharp
    assert default_recipe(points, budget_seconds=50) is None


def test_the_picture_is_written(tmp_path):
    path = draw_front([CHEAP, MIDDLE, BEST], 150, "test", tmp_path / "front.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
