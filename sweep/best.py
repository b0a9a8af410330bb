"""`best`: the study's winner under the rule, scored, exported and registered, and marked in MLflow.

The command's steps in order: read both studies once and rank them; when asked or when there is a
test split, rebuild the winner's model and score it as `predict` runs the exported file
(`clothing.scoring.folder_accuracy`); publish the ranking on the parent run once, with the test
score; then export and register. What `run` recorded on the parent run (the data folder, the
backbone weights) is used unless told otherwise, so `best` needs no more options than `run` had.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from clothing.checkpoint import CheckpointError, spec_of
from clothing.data import shown
from clothing.inference import BatchOptions
from clothing.model import ClothingClassifierMobileNet, ModelSpec, load_backbone
from clothing.scoring import export_model, folder_accuracy, model_from_checkpoint
from sweep.config import DataSettings, Stores, SweepError, default_tracking_uri, resolve_device
from sweep.ranking import Ranking, rule_text
from sweep.registry import CHAMPION_ALIAS, VersionInfo, register_winner
from sweep.study import Report, read_studies
from sweep.tracking import ParentRun, Tracker, browse_hint, publish

RECORDED = ("data_dir", "backbone_weights")  # what `best` takes from the run unless told


@dataclass(frozen=True)
class BestOptions:
    """Everything `python -m sweep best` was asked to do; a data setting left None is the run's."""

    stores: Stores
    data_dir: Path | None
    backbone_weights: str | None
    device: str
    tolerance: float | None  # None: the study's own
    export_path: Path | None = None
    tta: bool = False
    register_name: str | None = None
    register_format: str = "pyfunc"
    wide: bool = False  # the table's every column (sweep.ranking)

    def data(self, recorded: dict[str, str]) -> DataSettings:
        """The data settings: as given, else as the run recorded them, else the defaults."""
        given = {name: getattr(self, name) for name in RECORDED}
        chosen = {name: given[name] if given[name] is not None else recorded.get(name) for name in RECORDED}
        chosen = {name: value for name, value in chosen.items() if value is not None}
        paths = {name: Path(value) for name, value in chosen.items() if name != "backbone_weights"}
        return DataSettings(**{**chosen, **paths}, device=self.device)

    @property
    def rebuilds(self) -> bool:
        """Whether `best` rebuilds the winner's model whatever the data: to export, register or TTA it."""
        return self.export_path is not None or self.register_name is not None or self.tta


def evaluate_winner(
    ranking: Ranking, model: ClothingClassifierMobileNet, spec: ModelSpec, data: DataSettings, tta: bool
) -> dict[str, float]:
    """The winner's metrics: its recorded scores, plus val_acc with TTA when asked and test_acc when the
    data folder has a test/ split, each what the exported model (`model` and its `spec`, as
    model_from_checkpoint rebuilds it) gives on those images with `sweep predict` (--tta)."""
    winner = ranking.winner
    metrics = {"val_acc": winner.val_acc, "train_acc": winner.train_acc, "gap": winner.gap}
    metrics["best_epoch"] = winner.best_epoch
    device, test_dir = str(resolve_device(data.device)), data.data_dir / "test"
    if tta:
        folder = data.data_dir / "validation"
        metrics["val_acc_tta"] = folder_accuracy(model, spec, folder, BatchOptions(tta=True, device=device))
    if test_dir.is_dir():
        metrics["test_acc"] = folder_accuracy(model, spec, test_dir, BatchOptions(device=device))
    return metrics


def version_info(ranking: Ranking, study: str, metrics: dict) -> VersionInfo:
    """A registered version's description and tags: where it came from and how good it is."""
    winner = ranking.winner
    test = f", test_acc {metrics['test_acc']:.3f}" if "test_acc" in metrics else ""
    description = (
        f"{winner.name} of the Optuna study **{study}** (stage {winner.stage}), chosen by the rule: "
        f"{rule_text(ranking.tolerance)}. val_acc {winner.val_acc:.3f}{test}, gap {winner.gap:+.3f}. "
        f"Params: {json.dumps(winner.params)}."
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
    if winner.model_id:  # the trial's checkpoint, a logged model of its run, that this version was built from
        description += f" Built from {winner.name}'s checkpoint, the logged model models:/{winner.model_id}."
        tags["checkpoint_model_id"] = winner.model_id
    return VersionInfo(description, tags)


def run_best(options: BestOptions, say: Report) -> None:
    """The `best` command: rank, score, publish, and on request export and register the winner."""
    if options.export_path is not None and not options.export_path.parent.is_dir():
        raise CheckpointError(
            f"folder {shown(options.export_path.parent)} for --export does not exist; create it first"
        )
    stores = options.stores
    studies = read_studies(stores)
    ranking = studies.rank(options.tolerance)
    winner = ranking.winner
    if winner is None:
        raise SweepError(
            f"study {stores.study!r} has no COMPLETE trial yet; run `python -m sweep run --study {stores.study}`"
        )
    for line in ranking.lines(options.wide):
        say(line)
    tracker = Tracker(stores.tracking_uri)
    tracker.check_reachable()
    experiment_id = tracker.experiment_id(stores.study, create=False) or ""
    parent_id = tracker.find_parent(experiment_id) if experiment_id else None
    data = options.data(tracker.client.get_run(parent_id).data.params if parent_id else {})
    metrics, head, model = {}, None, None
    if options.rebuilds or (data.data_dir / "test").is_dir():
        head = tracker.fetch_checkpoint(winner)
        # Test scores, TTA and exports all need the weights it trained on (model_from_checkpoint checks).
        model = model_from_checkpoint(head, load_backbone(data.backbone_weights))
        metrics = evaluate_winner(ranking, model, spec_of(head), data, options.tta)
        scored = {f"best/{name}": metrics[name] for name in ("val_acc_tta", "test_acc") if name in metrics}
        if scored:
            tracker.log(winner.run_id, metrics=scored)
    if parent_id:
        publish(tracker, ParentRun(experiment_id, parent_id, stores.study), ranking, studies.stage1)
    say(ranking.winner_line(metrics))
    if "val_acc_tta" in metrics:
        say(f"val_acc {winner.val_acc:.3f} without TTA, {metrics['val_acc_tta']:.3f} with TTA (image + mirror)")
    if "test_acc" in metrics:
        say(f"(test_acc: the model's accuracy on the images of {shown(data.data_dir / 'test')})")
    if options.export_path is not None:
        export_model(head, model, options.export_path, metrics)
        say(f"Exported {winner.name} to {shown(options.export_path)}")
    if options.register_name is not None:
        name = options.register_name
        with tempfile.TemporaryDirectory() as scratch:
            # The registered model is the export, byte for byte: the file just written, or one made for it.
            model_file = options.export_path or export_model(head, model, Path(scratch) / "model.pt", metrics)
            info = version_info(ranking, stores.study, metrics)
            version = register_winner(tracker, model_file, name, info, options.register_format)
        say(f"Registered {winner.name} as models:/{name}/{version}, now models:/{name}@{CHAMPION_ALIAS}")
    say(f"Browse the runs: {browse_hint(tracker, stores.study, stores.tracking_uri == default_tracking_uri())}")
