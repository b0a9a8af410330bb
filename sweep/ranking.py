"""One ranking of a sweep: both studies' trials under the winner rule, derived once and read by
everything that shows a winner (`run`'s closing table, `trials`, `best`, the parent run's summary,
trials.csv and the plots). Nothing else calls `select_winner` on a whole study."""

from __future__ import annotations

from dataclasses import dataclass

from sweep.select import TrialRecord, eligible, rule_text, select_winner
from sweep.study import Studies, study_tolerance
from sweep.table import format_params, format_table, record_rows

LEADING = 10  # rows of the table `best` prints


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


def rank(studies: Studies, tolerance: float | None = None) -> Ranking:
    """Both stages' trials under the rule, with `tolerance` or else the one the study was run with."""
    records = studies.records()
    tolerance = study_tolerance(studies.stage1, tolerance)
    return Ranking(records, select_winner(records, tolerance), tolerance, dict(studies.stage1.user_attrs))
