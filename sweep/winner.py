"""`best`: the study's winner under the rule, marked in MLflow, then scored, exported and registered.

The command's steps in order: rank both studies' trials (`rank_study`), mark the winner and refresh
the parent run's plots (`mark_winner`), then, when asked or when there is a test split, rebuild the
winner's model and evaluate it (`evaluate_winner`, which returns its metrics the way `validate` does
in pytorch/examples), export it and register it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from clothing.checkpoint import CheckpointError
from clothing.data import shown
from clothing.model import load_backbone
from sweep.export import check_backbone, export_model, fetch_head, mirror_val_acc, register_winner, split_accuracy
from sweep.pipeline import publish_study, summarise_parent
from sweep.select import TrialRecord, eligible, rule_text, select_winner
from sweep.study import (
    Report,
    SweepError,
    format_params,
    load_studies,
    resolve_device,
    study_tolerance,
    trial_records,
)
from sweep.summary import version_info
from sweep.table import format_table, record_rows
from sweep.tracking import CHAMPION_ALIAS, Tracker, browse_hint

LEADING = 10  # rows of the table `best` prints


@dataclass(frozen=True)
class BestOptions:
    """Everything `python -m sweep best` was asked to do."""

    study: str
    storage: str
    tracking_uri: str
    data_dir: Path
    backbone_weights: str | None
    cache_dir: Path
    device: str
    tolerance: float | None  # None: the study's own
    export_path: Path | None = None
    tta: bool = False
    register_name: str | None = None
    register_format: str = "pickle"


@dataclass(frozen=True)
class Ranking:
    records: list[TrialRecord]
    winner: TrialRecord
    tolerance: float
    study_attrs: dict  # the stage-1 study's user attrs: its space and stages, for the parent's summary

    def lines(self) -> list[str]:
        """The leading trials and the rule, as `best` prints them above the winner line."""
        leading = sorted([r for r in self.records if r.state == "COMPLETE"], key=lambda r: -r.val_acc)[:LEADING]
        band = len(eligible(self.records, self.tolerance))
        return [
            format_table(record_rows(leading, self.winner)),
            f"\nRule: {rule_text(self.tolerance)} ({band} trial(s) in the band)",
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


def rank_study(study: str, storage: str, tolerance: float | None) -> Ranking:
    """Both stages' trials under the rule, with `tolerance` or else the one the study was run with."""
    stage1, stage2 = load_studies(study, storage)
    records = trial_records(stage1, stage2)
    tolerance = study_tolerance(stage1, tolerance)
    winner = select_winner(records, tolerance)
    if winner is None:
        raise SweepError(f"study {study!r} has no COMPLETE trial yet; run `python -m sweep run --study {study}`")
    return Ranking(records, winner, tolerance, stage1.user_attrs)


def mark_winner(tracker: Tracker, ranking: Ranking, study: str, storage: str) -> str | None:
    """Tag the winner's run and the parent run, and refresh the parent under this tolerance; returns
    the parent run's id."""
    experiment_id = tracker.experiment_id(study, create=False) or ""
    parent_id = tracker.find_parent(experiment_id)
    winner, tolerance = ranking.winner, ranking.tolerance
    tracker.mark_winner(experiment_id, winner.run_id, parent_id, winner.name, rule_text(tolerance), tolerance)
    if parent_id:
        publish_study(tracker, parent_id, study, storage, ranking.tolerance)
    return parent_id


def evaluate_winner(
    tracker: Tracker, winner: TrialRecord, head: dict, backbone, options: BestOptions
) -> dict[str, float]:
    """The winner's metrics: its recorded scores, plus val_acc with TTA when asked and test_acc when
    the data folder has a test/ split (both also logged on the winner's run, as best/...)."""
    metrics = {"val_acc": winner.val_acc, "train_acc": winner.train_acc, "gap": winner.gap}
    metrics["best_epoch"] = winner.best_epoch
    device = resolve_device(options.device)
    scored = {}
    if options.tta:
        scored["val_acc_tta"] = mirror_val_acc(head, backbone, Path(options.data_dir), options.cache_dir, device)
    test_dir = Path(options.data_dir) / "test"
    if test_dir.is_dir():
        scored["test_acc"] = split_accuracy(head, backbone, test_dir, options.cache_dir, device)
    if scored:
        tracker.log_metrics(winner.run_id, {f"best/{name}": value for name, value in scored.items()})
    return {**metrics, **scored}


def run_best(options: BestOptions, say: Report) -> None:
    """The `best` command: rank, mark, and on request score, export and register the winner."""
    if options.export_path is not None and not options.export_path.parent.is_dir():
        raise CheckpointError(
            f"folder {shown(options.export_path.parent)} for --export does not exist; create it first"
        )
    ranking = rank_study(options.study, options.storage, options.tolerance)
    for line in ranking.lines():
        say(line)
    tracker = Tracker(options.tracking_uri)
    tracker.check_reachable()
    parent_id = mark_winner(tracker, ranking, options.study, options.storage)
    has_test = (Path(options.data_dir) / "test").is_dir()
    if options.export_path is None and options.register_name is None and not options.tta and not has_test:
        say(ranking.winner_line())
        say(f"Browse the runs: {browse_hint(tracker, options.study)}")
        return
    winner = ranking.winner
    backbone = load_backbone(options.backbone_weights)
    head = fetch_head(tracker, winner)
    check_backbone(head, backbone)  # test scores, TTA and exports all need the weights it trained on
    metrics = evaluate_winner(tracker, winner, head, backbone, options)
    say(ranking.winner_line(metrics))
    if "val_acc_tta" in metrics:
        say(f"val_acc {winner.val_acc:.3f} without TTA, {metrics['val_acc_tta']:.3f} with TTA (image + mirror)")
    if "test_acc" in metrics:
        say(f"(test_acc: the winner's accuracy on the images of {shown(Path(options.data_dir) / 'test')})")
        if parent_id:  # the parent's summary now has the winner's test score
            summarise_parent(tracker, parent_id, ranking.records, winner, ranking.tolerance, ranking.study_attrs)
    if options.export_path is not None:
        export_model(head, backbone, options.export_path, metrics)
        say(f"Exported {winner.name} to {shown(options.export_path)}")
    if options.register_name is not None:
        info = version_info(winner, options.study, ranking.tolerance, metrics)
        name = options.register_name
        version = register_winner(tracker, head, backbone, name, info, options.register_format)
        say(f"Registered {winner.name} as models:/{name}/{version}, now models:/{name}@{CHAMPION_ALIAS}")
    say(f"Browse the runs: {browse_hint(tracker, options.study)}")
