"""The winner rule, as a pure function over trial records.

Among COMPLETE trials whose val_acc is within `tolerance` of the best, the smallest train/val gap
wins (both measured at the trial's checkpointed epoch); ties go to higher val_acc, then to stage 1
over stage 2, then the lower trial number. Only trials near the best accuracy are eligible, so an
untrained or diverged trial, whose gap is tiny because it learned nothing, can never win.

train_acc is the honest one: the model in eval mode on the plain training images (clothing.train),
not the running accuracy under dropout and augmentation, which would hide the gap.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_TOLERANCE = 0.02
HEAD_STAGE, FINETUNE_STAGE = "head", "finetune"  # stage 1 (a head on frozen features), stage 2


def trial_name(stage: str, number: int) -> str:
    """The one name of a trial, in the terminal, the tables, the plots and MLflow: trial-007 for a
    stage-1 trial, finetune-000 for a stage-2 one (stage 2 is a study of its own, numbered from 0)."""
    return f"{'trial' if stage == HEAD_STAGE else stage}-{number:03d}"


@dataclass(frozen=True)
class TrialRecord:
    number: int
    state: str  # Optuna's state name: COMPLETE, PRUNED, FAIL, ...
    params: dict = field(default_factory=dict)
    best_epoch: int | None = None
    train_acc: float | None = None
    val_acc: float | None = None
    run_id: str | None = None
    stage: str = HEAD_STAGE  # "head": a sweep trial; "finetune": stage 2, a stage-1 trial with its last blocks trained

    @property
    def name(self) -> str:
        return trial_name(self.stage, self.number)

    @property
    def source_trial(self) -> int | None:
        """Stage 2: the stage-1 trial it went on from."""
        return self.params.get("source_trial") if self.stage != HEAD_STAGE else None

    @property
    def gap(self) -> float | None:
        if self.train_acc is None or self.val_acc is None:
            return None
        return self.train_acc - self.val_acc


def rule_text(tolerance: float) -> str:
    return (
        f"among COMPLETE trials with val_acc >= best val_acc - {tolerance:g}, the smallest "
        "gap = train_acc - val_acc wins; ties: higher val_acc, then stage 1, then lower trial number"
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
    return sorted(band, key=lambda r: (r.gap, -r.val_acc, r.stage != HEAD_STAGE, r.number))


def select_winner(records: list[TrialRecord], tolerance: float = DEFAULT_TOLERANCE) -> TrialRecord | None:
    """The winning trial, or None when no trial is COMPLETE."""
    ranked = eligible(records, tolerance)
    return ranked[0] if ranked else None
