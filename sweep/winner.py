"""`best`: the study's winner under the rule, scored, exported and registered, and marked in MLflow.

The command's steps in order: read both studies once and rank them (`sweep.ranking.rank`); when asked
or when there is a test split, rebuild the winner's model and score it (`evaluate_winner`, through
`clothing.scoring.validate`); publish the ranking on the parent run once, with the test score; then
export and register.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from clothing.checkpoint import CheckpointError
from clothing.data import shown
from clothing.model import load_backbone
from clothing.scoring import check_backbone, export_model, validate
from sweep.publish import publish
from sweep.ranking import Ranking, rank
from sweep.refit import refit_name
from sweep.registry import CHAMPION_ALIAS, register_winner
from sweep.study import Report, SweepError, read_studies, resolve_device
from sweep.summary import TRAINED_ON, version_info
from sweep.tracking import ParentRun, Tracker, browse_hint


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
    refit: bool = True  # ship the winner's refit (sweep.refit) where there is one
    register_name: str | None = None
    register_format: str = "pyfunc"
    wide: bool = False  # the table's every column (sweep.table)

    @property
    def test_dir(self) -> Path:
        return Path(self.data_dir) / "test"

    @property
    def scores(self) -> bool:
        """Whether `best` rebuilds the winner's model: to score, export or register it."""
        wanted = (self.export_path, self.register_name)
        return any(w is not None for w in wanted) or self.tta or self.test_dir.is_dir()


def evaluate_winner(ranking: Ranking, head: dict, shipped: dict, backbone, options: BestOptions) -> dict[str, float]:
    """The winner's metrics: its recorded scores, plus val_acc with TTA (of the chosen trial's `head`)
    when asked and test_acc (of the `shipped` model: the head, or its refit) when the data folder has a
    test/ split."""
    winner = ranking.winner
    metrics = {"val_acc": winner.val_acc, "train_acc": winner.train_acc, "gap": winner.gap}
    metrics["best_epoch"] = winner.best_epoch
    device = resolve_device(options.device)
    if options.tta:
        folder = Path(options.data_dir) / "validation"
        metrics["val_acc_tta"] = validate(head, backbone, folder, options.cache_dir, device, tta=True)["acc"]
    if options.test_dir.is_dir():
        metrics["test_acc"] = validate(shipped, backbone, options.test_dir, options.cache_dir, device)["acc"]
    return metrics


def scored_metrics(metrics: dict) -> dict[str, float]:
    """What `best` measured itself, as logged on the winner's run (`best/test_acc`, ...)."""
    return {f"best/{name}": metrics[name] for name in ("val_acc_tta", "test_acc") if name in metrics}


def run_best(options: BestOptions, say: Report) -> None:
    """The `best` command: rank, score, publish, and on request export and register the winner."""
    if options.export_path is not None and not options.export_path.parent.is_dir():
        raise CheckpointError(
            f"folder {shown(options.export_path.parent)} for --export does not exist; create it first"
        )
    studies = read_studies(options.storage, options.study)
    ranking = rank(studies, options.tolerance)
    winner = ranking.winner
    if winner is None:
        raise SweepError(
            f"study {options.study!r} has no COMPLETE trial yet; run `python -m sweep run --study {options.study}`"
        )
    for line in ranking.lines(options.wide):
        say(line)
    tracker = Tracker(options.tracking_uri)
    tracker.check_reachable()
    experiment_id = tracker.experiment_id(options.study, create=False) or ""
    refit_id = tracker.find_refit(experiment_id, winner) if options.refit and experiment_id else None
    metrics, shipped, backbone = {}, None, None
    if options.scores:
        backbone = load_backbone(options.backbone_weights)
        head = tracker.fetch_checkpoint(winner)
        check_backbone(head, backbone)  # test scores, TTA and exports all need the weights it trained on
        shipped = tracker.run_checkpoint(refit_id) if refit_id else head
        metrics = evaluate_winner(ranking, head, shipped, backbone, options)
        if scored_metrics(metrics):
            tracker.log_metrics(refit_id or winner.run_id, scored_metrics(metrics))
    parent_id = tracker.find_parent(experiment_id)
    if parent_id:
        publish(tracker, ParentRun(experiment_id, parent_id, options.study), ranking, studies.stage1)
    say(ranking.winner_line(metrics))
    if "val_acc_tta" in metrics:
        say(f"val_acc {winner.val_acc:.3f} without TTA, {metrics['val_acc_tta']:.3f} with TTA (image + mirror)")
    model_name = winner.name
    if refit_id:
        model_name = f"{winner.name}'s refit on {TRAINED_ON} (run {refit_name(winner)})"
        say(f"The model: {model_name}; val_acc and gap are {winner.name}'s, test_acc is the refit's")
    if "test_acc" in metrics:
        say(f"(test_acc: the model's accuracy on the images of {shown(options.test_dir)})")
    if options.export_path is not None:
        export_model(shipped, backbone, options.export_path, metrics)
        say(f"Exported {model_name} to {shown(options.export_path)}")
    if options.register_name is not None:
        info = version_info(winner, options.study, ranking.tolerance, metrics, refit=bool(refit_id))
        name = options.register_name
        with tempfile.TemporaryDirectory() as scratch:
            # The registered model is the export, byte for byte: the file just written, or one made for it.
            model_file = options.export_path or export_model(shipped, backbone, Path(scratch) / "model.pt", metrics)
            version = register_winner(tracker, model_file, name, info, options.register_format)
        say(f"Registered {winner.name} as models:/{name}/{version}, now models:/{name}@{CHAMPION_ALIAS}")
    say(f"Browse the runs: {browse_hint(tracker, options.study)}")
