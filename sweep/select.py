"""The winner rule, as a pure function over trial records.

Among COMPLETE trials whose val_acc is within `tolerance` of the best, the smallest train/val gap
wins (both measured at the trial's checkpointed epoch); ties go to higher val_acc, then the lower
trial number. Only trials near the best accuracy are eligible, so an untrained or diverged trial,
whose gap is tiny because it learned nothing, can never win.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_TOLERANCE = 0.02


@dataclass(frozen=True)
class TrialRecord:
    number: int
    state: str  # Optuna's state name: COMPLETE, PRUNED, FAIL, ...
    params: dict = field(default_factory=dict)
    best_epoch: int | None = None
    train_acc: float | None = None
    val_acc: float | None = None
    run_id: str | None = None
    stage: str = "head"  # "head": a sweep trial; "finetune": stage 2, the winner with its last blocks trained
    source_trial: int | None = None  # stage 2: the sweep trial it went on from (whose params it shows)

    @property
    def gap(self) -> float | None:
        if self.train_acc is None or self.val_acc is None:
            return None
        return self.train_acc - self.val_acc


def rule_text(tolerance: float) -> str:
    return (
        f"among COMPLETE trials with val_acc >= best val_acc - {tolerance:g}, the smallest "
        "gap = train_acc - val_acc wins; ties: higher val_acc, then lower trial number"
    )


def eligible(records: list[TrialRecord], tolerance: float = DEFAULT_TOLERANCE) -> list[TrialRecord]:
    """The trials the rule chooses from, in the rule's order (the winner first)."""
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    complete = [r for r in records if r.state == "COMPLETE" and r.gap is not None]
    if not complete:
        return []
    best = max(r.val_acc for r in complete)
    # A tiny epsilon so that a trial exactly at the band's edge is not lost to float rounding.
    band = [r for r in complete if r.val_acc >= best - tolerance - 1e-12]
    return sorted(band, key=lambda r: (r.gap, -r.val_acc, r.number))


def select_winner(records: list[TrialRecord], tolerance: float = DEFAULT_TOLERANCE) -> TrialRecord | None:
    """The winning trial, or None when no trial is COMPLETE."""
    ranked = eligible(records, tolerance)
    return ranked[0] if ranked else None
