"""The winner rule, the one ranking of a sweep, and how it reads as a table.

The rule, a pure function over trial records: among COMPLETE trials whose val_acc is within
`tolerance` of the best, the smallest train/val gap wins (both measured at the trial's checkpointed
epoch); ties go to higher val_acc, then to stage 1 over stage 2, then the lower trial number. Only
trials near the best accuracy are eligible, so an untrained or diverged trial, whose gap is tiny
because it learned nothing, can never win. train_acc is the honest one: the model in eval mode on the
plain training images (clothing.train), not the running accuracy under dropout and augmentation.

A `Ranking` is derived once per command (`sweep.study.rank`) and read by everything that shows a
winner: `run`'s closing table, `trials`, `best`, the parent run's summary, trials.csv and the plots.

The table has one format per kind of number, whatever its size: a parameter in 3 significant digits
(lr 0.0483, 0.00222, 0.0001), a score (an accuracy, a gap) in 3 decimals. It fits 120 columns: a
setting every row that has it shares (stage 2's recipe, a fixed epoch count) is said once above it,
and `wide` shows every column, the MLflow run and logged-model ids too.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field

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
    model_id: str | None = None  # its checkpoint's MLflow logged model (`models:/<model_id>`)
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


def eligible(records: list[TrialRecord], tolerance: float) -> list[TrialRecord]:
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


def select_winner(records: list[TrialRecord], tolerance: float) -> TrialRecord | None:
    """The winning trial, or None when no trial is COMPLETE."""
    ranked = eligible(records, tolerance)
    return ranked[0] if ranked else None


LEADING_PARAMS = ("lr", "size_inner")  # the seed's dimensions first; the rest in name order
SCORES = ("train_acc", "val_acc", "gap")
ALWAYS_SHOWN = ("trial", "stage", "state", "best_epoch", *SCORES)
MLFLOW_IDS = ("mlflow_run_id", "mlflow_model_id")  # columns of --wide, CSV and JSON
TABLE_WIDTH = 120


def format_number(value) -> str:
    """A parameter as the terminal shows it: floats in 3 significant digits, the rest as they are."""
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def format_params(params: dict) -> str:
    return "  ".join(f"{k} {format_number(v)}" for k, v in params.items())


def param_columns(records: list[TrialRecord]) -> list[str]:
    """Every parameter any trial has: searched dimensions and stage 2's own show up by themselves."""
    names = {name for r in records for name in r.params}
    return [n for n in LEADING_PARAMS if n in names] + sorted(names - set(LEADING_PARAMS))


def record_rows(records: list[TrialRecord], winner: TrialRecord | None = None) -> list[dict]:
    """Flat rows for tables and CSV/JSON files."""
    params = param_columns(records)
    return [
        {
            "winner": winner is not None and r.name == winner.name,
            "trial": r.name,
            "stage": r.stage,
            "state": r.state,
            **{p: r.params.get(p) for p in params},
            "best_epoch": r.best_epoch,
            "train_acc": r.train_acc,
            "val_acc": r.val_acc,
            "gap": r.gap,
            "mlflow_run_id": r.run_id,
            "mlflow_model_id": r.model_id,
        }
        for r in records
    ]


def shared_settings(rows: list[dict]) -> dict[str, dict]:
    """The parameter columns whose value is the same in every row that has one, by the stages of
    those rows ("stage 1", "stage 2" or "all trials"): what the table says once above itself."""
    shared: dict[str, dict] = {}
    for column in rows[0]:
        if column in ALWAYS_SHOWN or column in ("winner", *MLFLOW_IDS):
            continue
        having = [row for row in rows if row[column] is not None]
        if len(rows) < 2 or not having or len({format_number(row[column]) for row in having}) > 1:
            continue
        stages = {row["stage"] for row in having}
        if len(having) < len(rows):
            where = "stage 1" if stages == {HEAD_STAGE} else "stage 2" if HEAD_STAGE not in stages else "some trials"
        else:
            where = "all trials"
        shared.setdefault(where, {})[column] = having[0][column]
    return shared


def _wrapped(label: str, settings: dict, width: int = TABLE_WIDTH) -> list[str]:
    """`label` and the settings, as lines of at most `width` characters broken between settings."""
    lines, line = [], label
    for item in (format_params({name: value}) for name, value in settings.items()):
        if len(line) + 2 + len(item) > width and line.strip() != label.strip():
            lines.append(line)
            line = " " * len(label)
        line += "  " + item
    return [*lines, line]


def format_table(rows: list[dict], wide: bool = False) -> str:
    """Aligned columns, the winner's row starred. Unless `wide`, the shared settings (shared_settings)
    are lines above the table instead of columns, and the MLflow run and model ids are left out."""

    def cell(column: str, value) -> str:
        if value is None:
            return "-"
        if column in SCORES:
            return f"{value:+.3f}" if column == "gap" else f"{value:.3f}"
        return format_number(value)

    if not rows:
        return "  (no trials)"
    shared = {} if wide else shared_settings(rows)
    hidden = {"winner", *(name for settings in shared.values() for name in settings)}
    if not wide:
        hidden.update(MLFLOW_IDS)
    columns = [c for c in rows[0] if c not in hidden]
    cells = [[cell(c, row[c]) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = [line for where, settings in sorted(shared.items()) for line in _wrapped(f"  {where}:", settings)]
    lines.append("  " + "  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for row, rendered in zip(rows, cells):
        lines.append(("* " if row["winner"] else "  ") + "  ".join(v.rjust(w) for v, w in zip(rendered, widths)))
    return "\n".join(lines)


def rows_to_csv(rows: list[dict]) -> str:
    if not rows:
        return ""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


LEADING = 10  # rows of the table `best` prints
PARENT_TEST_METRIC = "winner/test_acc"


@dataclass(frozen=True)
class Ranking:
    """The records of both stages, the winner under `tolerance` (None while no trial is COMPLETE), and
    the stage-1 study's user attrs (its space and stages, for the parent run's summary)."""

    records: list[TrialRecord]
    winner: TrialRecord | None
    tolerance: float
    study_attrs: dict

    @property
    def band(self) -> list[TrialRecord]:
        """The trials the rule chose from, the winner first."""
        return eligible(self.records, self.tolerance)

    def rows(self, records: list[TrialRecord] | None = None) -> list[dict]:
        """Table rows of `records` (all of them by default), the winner's starred."""
        return record_rows(self.records if records is None else records, self.winner)

    def lines(self, wide: bool = False) -> list[str]:
        """The leading trials and the rule, as `best` prints them above the winner line."""
        leading = sorted([r for r in self.records if r.state == "COMPLETE"], key=lambda r: -r.val_acc)[:LEADING]
        return [
            format_table(self.rows(leading), wide),
            f"\nRule: {rule_text(self.tolerance)} ({len(self.band)} trial(s) in the band)",
        ]

    def winner_line(self, metrics: dict | None = None) -> str:
        """The winner, its params and scores: val_acc, and test_acc when `best` scored it on test/."""
        winner, metrics = self.winner, metrics or {}
        scores = f"val_acc {winner.val_acc:.3f}"
        if "test_acc" in metrics:
            scores += f"  test_acc {metrics['test_acc']:.3f}"
        source = f"  [stage 2 of trial-{winner.source_trial:03d}]" if winner.source_trial is not None else ""
        return (
            f"Winner: {winner.name}  {format_params(winner.params)}  {scores}  gap {winner.gap:+.3f}"
            f"  (epoch {winner.best_epoch}){source}"
        )

    def counts(self) -> dict[str, int]:
        """Both stages' trials by state, and the finished stage-1 ones: what `--trials` counts."""
        states = [r.state for r in self.records]
        finished = sum(r.stage == HEAD_STAGE and r.state in ("COMPLETE", "PRUNED") for r in self.records)
        return {
            "trials/finished": finished,
            "trials/complete": states.count("COMPLETE"),
            "trials/pruned": states.count("PRUNED"),
            "trials/failed": states.count("FAIL"),
        }

    def parent_metrics(self, test_acc: float | None) -> dict[str, float]:
        """The parent run's metrics: counts by state, the best val_acc, and the winner's scores. A winner
        not scored on test/ gets NaN, so an earlier winner's test score never stands for this one."""
        metrics: dict[str, float] = self.counts()
        complete = [r.val_acc for r in self.records if r.state == "COMPLETE" and r.val_acc is not None]
        if complete:
            metrics["study/best_val_acc"] = max(complete)
        winner = self.winner
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

    def description(self, test_acc: float | None = None) -> str:
        """Markdown for the parent run: the winner, the rule, the search space and the stages."""
        counts, winner = self.counts(), self.winner
        if winner is None:
            outcome = "No trial has COMPLETED yet, so there is no winner."
        else:
            scores = f"val_acc {winner.val_acc:.3f}, gap {winner.gap:+.3f} at epoch {winner.best_epoch}"
            if test_acc is not None:
                scores += f", test_acc {test_acc:.3f}"
            source = f" (stage 2 of trial-{winner.source_trial:03d})" if winner.stage == FINETUNE_STAGE else ""
            outcome = f"**Winner: {winner.name}**{source}: {scores}. Its run is tagged `sweep.winner = true`."
        space = self.study_attrs.get("search_space", {}).get("stage1", {})
        fixed = ", ".join(f"{name} {value}" for name, value in space.get("fixed", {}).items())
        return "\n".join(
            [
                outcome,
                "",
                f"Trials: {counts['trials/complete']} complete, {counts['trials/pruned']} pruned, "
                f"{counts['trials/failed']} failed.",
                "",
                f"**Rule**: {rule_text(self.tolerance)}.",
                "",
                "**Search space** (stage 1):",
                *[f"- `{name}`: {what}" for name, what in space.get("searched", {}).items()],
                *([f"- fixed: {fixed}"] if fixed else []),
                "",
                "**Stages**:",
                *[f"- {text}" for text in self.study_attrs.get("stages", {}).values()],
            ]
        )


def rank(records: list[TrialRecord], tolerance: float, study_attrs: dict) -> Ranking:
    """Both stages' trials under the rule with `tolerance`."""
    return Ranking(records, select_winner(records, tolerance), tolerance, study_attrs)
