"""What the study says about itself in MLflow: the experiment's and the parent run's descriptions, the
parent run's metrics, and a registered version's description and tags.

Pure functions of the study's records and the Optuna study's user attrs (`describe_study`), so `run`
and `best` write the same summary, and a collapsed parent row in MLflow tells what happened.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from sweep.select import FINETUNE_STAGE, HEAD_STAGE, TrialRecord, rule_text

TRAINED_ON = "train + validation"  # what a refit (sweep.refit) trained on, in its record and the registry

TEST_METRIC = "best/test_acc"  # the winner's checkpoint scored on test/ (by `best`), on its own run
PARENT_TEST_METRIC = "winner/test_acc"


@dataclass(frozen=True)
class VersionInfo:
    """What a registered model version says about itself in the registry."""

    description: str
    tags: dict[str, str] = field(default_factory=dict)


def experiment_description(study: str, data_dir: str) -> str:
    return (
        f"Optuna study **{study}**: a hyperparameter sweep of a classifier head on a frozen ImageNet "
        f"MobileNetV2, on the images of `{data_dir}`. One parent run for the study (named `{study}`), one "
        "nested run per trial (`trial-NNN`; stage 2: `finetune-NNN`). Per-epoch curves are `train_loss`, "
        "`train_acc`, `val_loss`, `val_acc` at step = epoch; single values at a trial's best epoch are "
        "`best/...`. The winner is tagged `sweep.winner = true`."
    )


def count_states(records: list[TrialRecord]) -> dict[str, int]:
    """Both stages' trials by state, and the finished stage-1 ones: what `--trials` counts."""
    states = [r.state for r in records]
    complete, pruned, failed = states.count("COMPLETE"), states.count("PRUNED"), states.count("FAIL")
    finished = sum(r.stage == HEAD_STAGE and r.state in ("COMPLETE", "PRUNED") for r in records)
    return {
        "trials/finished": finished,
        "trials/complete": complete,
        "trials/pruned": pruned,
        "trials/failed": failed,
    }


def parent_metrics(records: list[TrialRecord], winner: TrialRecord | None, test_acc: float | None) -> dict:
    """The parent run's metrics: counts by state, the best val_acc, and the winner's scores. A winner
    not scored on test/ gets NaN, so an earlier winner's test score never stands for this one."""
    metrics: dict[str, float] = count_states(records)
    complete = [r.val_acc for r in records if r.state == "COMPLETE" and r.val_acc is not None]
    if complete:
        metrics["study/best_val_acc"] = max(complete)
    if winner is not None:
        metrics |= {
            "winner/val_acc": winner.val_acc,
            "winner/train_acc": winner.train_acc,
            "winner/gap": winner.gap,
            "winner/trial": winner.number,
            "winner/best_epoch": winner.best_epoch,
            PARENT_TEST_METRIC: math.nan if test_acc is None else test_acc,
        }
    return metrics


def _space_lines(stage1_attrs: dict) -> list[str]:
    space = stage1_attrs.get("search_space", {}).get("stage1", {})
    lines = [f"- `{name}`: {what}" for name, what in space.get("searched", {}).items()]
    fixed = ", ".join(f"{name} {value}" for name, value in space.get("fixed", {}).items())
    return lines + ([f"- fixed: {fixed}"] if fixed else [])


def parent_description(
    records: list[TrialRecord],
    winner: TrialRecord | None,
    tolerance: float,
    stage1_attrs: dict,
    test_acc: float | None = None,
) -> str:
    """Markdown for the parent run: the winner, the rule, the search space and the stages."""
    counts = count_states(records)
    if winner is None:
        outcome = "No trial has COMPLETED yet, so there is no winner."
    else:
        scores = f"val_acc {winner.val_acc:.3f}, gap {winner.gap:+.3f} at epoch {winner.best_epoch}"
        if test_acc is not None:
            scores += f", test_acc {test_acc:.3f}"
        source = f" (stage 2 of trial-{winner.source_trial:03d})" if winner.stage == FINETUNE_STAGE else ""
        outcome = f"**Winner: {winner.name}**{source}: {scores}. Its run is tagged `sweep.winner = true`."
    stages = stage1_attrs.get("stages", {})
    return "\n".join(
        [
            outcome,
            "",
            f"Trials: {counts['trials/complete']} complete, {counts['trials/pruned']} pruned, "
            f"{counts['trials/failed']} failed.",
            "",
            f"**Rule**: {rule_text(tolerance)}.",
            "",
            "**Search space** (stage 1):",
            *_space_lines(stage1_attrs),
            "",
            "**Stages**:",
            *[f"- {text}" for text in stages.values()],
        ]
    )


def version_info(winner: TrialRecord, study: str, tolerance: float, metrics: dict, refit: bool = False) -> VersionInfo:
    """A registered version's description and tags: where it came from and how good it is (`refit`:
    the model is the winner's refit on train + validation, sweep.refit)."""
    test = f", test_acc {metrics['test_acc']:.3f}" if "test_acc" in metrics else ""
    refit_note = f" The model is its refit on {TRAINED_ON} (run --refit); val_acc is the trial's." if refit else ""
    description = (
        f"{winner.name} of the Optuna study **{study}** (stage {winner.stage}), chosen by the rule: "
        f"{rule_text(tolerance)}. val_acc {winner.val_acc:.3f}{test}, gap {winner.gap:+.3f}. "
        f"Params: {json.dumps(winner.params)}.{refit_note}"
    )
    tags = {
        "val_acc": f"{winner.val_acc:.4f}",
        "gap": f"{winner.gap:.4f}",
        "trial": winner.name,
        "study": study,
        "stage": winner.stage,
    }
    if "test_acc" in metrics:
        tags["test_acc"] = f"{metrics['test_acc']:.4f}"
    if refit:
        tags["trained_on"] = TRAINED_ON
    return VersionInfo(description, tags)
