"""The front of held-out accuracy against cold time (`python -m bench.accuracy --front`), and the rule
that picks the default recipe from it.

A recipe is on the front when no other recipe is both at least as accurate and at least as cheap,
and better in one of the two. The default is the most accurate recipe on the front whose cold time
fits the budget (one notebook pass over the data on the same machine, the bench's A), or the
cheapest recipe whose accuracy lies within that one's 95 % interval: a difference the images cannot
pin down is not worth paying for.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Point:
    """One recipe: its held-out accuracy with its 95 % interval, and its cold time."""

    recipe: str
    accuracy: float
    low: float
    high: float
    seconds: float


def dominated(point: Point, others: list[Point]) -> bool:
    """Whether another recipe is at least as accurate and as cheap as `point`, and better in one."""
    return any(
        o.accuracy >= point.accuracy
        and o.seconds <= point.seconds
        and (o.accuracy > point.accuracy or o.seconds < point.seconds)
        for o in others
        if o is not point
    )


def front(points: list[Point]) -> list[Point]:
    """The recipes no other one dominates, cheapest first."""
    return sorted((p for p in points if not dominated(p, points)), key=lambda p: p.seconds)


def default_recipe(points: list[Point], budget_seconds: float) -> Point | None:
    """The most accurate recipe on the front within the budget, or the cheapest one within its 95 %
    interval; None when nothing fits."""
    fitting = [p for p in front(points) if p.seconds <= budget_seconds]
    if not fitting:
        return None
    best = max(fitting, key=lambda p: (p.accuracy, -p.seconds))
    close = [p for p in points if p.seconds <= budget_seconds and p.accuracy >= best.low]
    return min(close, key=lambda p: (p.seconds, -p.accuracy))


def draw_front(points: list[Point], budget_seconds: float, title: str, path: Path) -> Path:
    """The picture: every recipe (accuracy and its 95 % interval), the front joined, the budget as a vertical line and
    the default the rule picks starred."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    on_front, chosen = front(points), default_recipe(points, budget_seconds)
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for p in points:
        style = {"color": "tab:blue" if p in on_front else "tab:gray", "fmt": "o", "capsize": 3}
        ax.errorbar(p.seconds, p.accuracy, yerr=[[p.accuracy - p.low], [p.high - p.accuracy]], **style)
        ax.annotate(p.recipe, (p.seconds, p.accuracy), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.plot([p.seconds for p in on_front], [p.accuracy for p in on_front], color="tab:blue", lw=1, label="front")
    if chosen is not None:
        ax.plot(chosen.seconds, chosen.accuracy, "*", color="tab:red", ms=14, label="the rule's default")
    ax.margins(x=0.35, y=0.1)  # room for the labels
    ax.axvline(budget_seconds, color="tab:red", ls="--", lw=1, label=f"one notebook pass (A = {budget_seconds:.0f} s)")
    ax.set_xlabel("cold time of `sweep run` + `best --export` (s)")
    ax.set_ylabel("k-fold accuracy of what `best` ships (95 % interval)")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
