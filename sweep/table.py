"""The trials table: rows for the terminal, trials.csv and JSON, every trial under its one name."""

from __future__ import annotations

import csv
import io

from sweep.select import TrialRecord

LEADING_PARAMS = ("lr", "size_inner")  # the seed's dimensions first; the rest in name order


def format_params(params: dict) -> str:
    def value(v) -> str:
        return f"{v:.2e}" if isinstance(v, float) and v != 0 and abs(v) < 1e-2 else str(v)

    return "  ".join(f"{k} {value(v)}" for k, v in params.items())


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


def format_table(rows: list[dict], with_run_id: bool = False) -> str:
    """Aligned columns; the winner's row is starred."""

    def cell(value) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.2e}" if abs(value) < 1e-2 and value != 0 else f"{value:.3f}"
        return str(value)

    if not rows:
        return "  (no trials)"
    hidden = {"winner"} if with_run_id else {"winner", "mlflow_run_id"}
    columns = [c for c in rows[0] if c not in hidden]
    cells = [[cell(row[c]) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  " + "  ".join(c.rjust(w) for c, w in zip(columns, widths))]
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
