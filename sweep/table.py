"""The trials table: rows for the terminal, trials.csv and JSON, every trial under its one name.

What the terminal shows has one format per kind of number, whatever its size: a parameter in 3
significant digits (lr 0.0483, 0.00222, 0.0001), a score (an accuracy, a gap) in 3 decimals. The
table fits 120 columns: a setting every row that has it shares (stage 2's recipe, a fixed epoch count)
is said once above it, and `wide` shows every column, the MLflow run ids too.
"""

from __future__ import annotations

import csv
import io

from sweep.select import HEAD_STAGE, TrialRecord

LEADING_PARAMS = ("lr", "size_inner")  # the seed's dimensions first; the rest in name order
SCORES = ("train_acc", "val_acc", "gap")
ALWAYS_SHOWN = ("trial", "stage", "state", "best_epoch", *SCORES)
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
        }
        for r in records
    ]


def shared_settings(rows: list[dict]) -> dict[str, dict]:
    """The parameter columns whose value is the same in every row that has one, by the stages of
    those rows ("stage 1", "stage 2" or "all trials"): what the table says once above itself."""
    shared: dict[str, dict] = {}
    for column in rows[0]:
        if column in ALWAYS_SHOWN or column in ("winner", "mlflow_run_id"):
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
    are lines above the table instead of columns, and the MLflow run ids are left out."""

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
        hidden.add("mlflow_run_id")
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
