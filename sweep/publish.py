"""What a sweep shows in MLflow once it has a ranking: the winner tagged, the parent run's summary
(metrics and description), trials.csv and the study plots. `run` publishes when it ends and `best`
when it has scored the winner, both from the one Ranking they derived."""

from __future__ import annotations

import tempfile
from pathlib import Path

import optuna

from sweep.plots import study_plots
from sweep.ranking import Ranking
from sweep.summary import TEST_METRIC, parent_description, parent_metrics
from sweep.table import rows_to_csv
from sweep.tracking import NOTE_TAG, ParentRun, Tracker


def publish(tracker: Tracker, parent: ParentRun, ranking: Ranking, stage1: optuna.Study) -> None:
    """Refresh the parent run and tag the winner, all from `ranking`. The winner's test score is the
    one `best` logged on the winner's own run, if any."""
    winner = ranking.winner
    tracker.mark_winner(parent, winner, ranking.tolerance)
    test_acc = tracker.latest_metrics(winner.run_id).get(TEST_METRIC) if winner and winner.run_id else None
    tracker.log_metrics(parent.run_id, parent_metrics(ranking.records, winner, test_acc))
    description = parent_description(ranking.records, winner, ranking.tolerance, ranking.study_attrs, test_acc)
    tracker.set_tags(parent.run_id, {NOTE_TAG: description})
    tracker.log_text(parent.run_id, rows_to_csv(ranking.rows()), "trials.csv")
    with tempfile.TemporaryDirectory() as tmp:
        for path in study_plots(stage1, ranking, Path(tmp)):
            tracker.log_file(parent.run_id, path, "plots")
