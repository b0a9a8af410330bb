"""Pictures of a sweep: per-trial learning curves and the study-level plots on the parent run."""

from __future__ import annotations

import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import optuna  # noqa: E402

from sweep.ranking import HEAD_STAGE, Ranking, TrialRecord  # noqa: E402


def learning_curves(history: list[dict], best_epoch: int, path: Path) -> Path:
    """Train/val loss and accuracy per epoch, the checkpointed epoch marked."""
    epochs = [h["epoch"] for h in history]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, metric in ((loss_ax, "loss"), (acc_ax, "acc")):
        ax.plot(epochs, [h[f"train_{metric}"] for h in history], "o-", label="train")
        ax.plot(epochs, [h[f"val_{metric}"] for h in history], "o-", label="validation")
        ax.axvline(best_epoch, color="grey", linestyle="--", label=f"checkpoint (epoch {best_epoch})")
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    acc_ax.legend(loc="lower right", fontsize=8)
    # Fixed margins instead of tight_layout's extra drawing pass: every trial draws one of these,
    # and the pass was a third of the 0.33 s a plot took.
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.14, top=0.96, wspace=0.22)
    return _save(fig, path, tight=False)


def winner_rule(ranking: Ranking, path: Path) -> Path:
    """val_acc against gap for every COMPLETE trial of `ranking`, the tolerance band shaded, the winner
    marked."""
    records, tolerance, winner = ranking.records, ranking.tolerance, ranking.winner
    complete = [r for r in records if r.state == "COMPLETE" and r.gap is not None]
    band = {r.name for r in ranking.band}
    fig, ax = plt.subplots(figsize=(6, 4.5))
    if complete:
        best = max(r.val_acc for r in complete)
        ax.axhspan(best - tolerance, best, color="tab:green", alpha=0.15, label=f"within {tolerance:g} of best")
        for inside in (True, False):
            group = [r for r in complete if (r.name in band) == inside]
            ax.scatter(
                [r.gap for r in group],
                [r.val_acc for r in group],
                s=30,
                color="tab:green" if inside else "tab:grey",
                label="eligible" if inside else "other",
            )
        for r in complete:
            ax.annotate(
                r.name.removeprefix("trial-"), (r.gap, r.val_acc), fontsize=7, xytext=(3, 3), textcoords="offset points"
            )
    if winner is not None:
        ax.scatter([winner.gap], [winner.val_acc], s=200, marker="*", color="tab:red", label=f"winner: {winner.name}")
    ax.set_xlabel("gap = train_acc - val_acc, at the best epoch\n(train_acc: eval mode, plain training images)")
    ax.set_ylabel("val_acc")
    ax.set_title("Winner rule: smallest gap among the most accurate")
    ax.grid(alpha=0.3)
    if complete:  # nothing to explain on an empty plot
        ax.legend(fontsize=8)
    return _save(fig, path)


def lr_by_size_inner(records: list[TrialRecord], path: Path) -> Path:
    """Where the good configurations are: stage 1's lr (log) by size_inner, coloured by val_acc."""
    done = [r for r in records if r.val_acc is not None and r.stage == HEAD_STAGE]
    fig, ax = plt.subplots(figsize=(6, 4))
    sizes = sorted({r.params["size_inner"] for r in done})
    points = ax.scatter(
        [r.params["lr"] for r in done],
        [sizes.index(r.params["size_inner"]) for r in done],
        c=[r.val_acc for r in done],
        cmap="viridis",
        s=60,
        edgecolors="k",
    )
    ax.set_xscale("log")
    ax.set_yticks(range(len(sizes)), [str(s) for s in sizes])
    ax.set_xlabel("learning rate")
    ax.set_ylabel("size_inner")
    fig.colorbar(points, ax=ax, label="best val_acc")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def study_plots(study: optuna.Study, ranking: Ranking, folder: Path) -> list[Path]:
    """All study-level plots of `ranking` into `folder`; Optuna's own (of the stage-1 `study`) where
    they fit, ours for the rest."""
    folder.mkdir(parents=True, exist_ok=True)
    records = ranking.records
    paths = [
        winner_rule(ranking, folder / "winner_rule.png"),
        lr_by_size_inner(records, folder / "lr_by_size_inner.png"),
    ]
    optuna_plots = {
        "optimization_history.png": optuna.visualization.matplotlib.plot_optimization_history,
        "param_importances.png": optuna.visualization.matplotlib.plot_param_importances,
    }
    complete = sum(r.state == "COMPLETE" for r in records)
    for name, plot in optuna_plots.items():
        if name == "param_importances.png" and complete < 4:
            continue  # importances of two or three points say nothing
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna's matplotlib plots are marked experimental
            try:
                axes = plot(study)
            except (ValueError, RuntimeError):  # e.g. all trials had the same value
                continue
        paths.append(_save(axes.figure, folder / name))
    return paths


def _save(fig, path: Path, tight: bool = True) -> Path:
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
