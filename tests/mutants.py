"""`make mutants`: plant known bugs one at a time and check that the test suite catches each one.

Each mutant replaces one piece of code (which must occur exactly once) in a fresh copy of the
working tree, then runs only the tests that should catch it, in that copy. A mutant is killed when
one of them fails; it survives when they all pass. The unmutated copy runs the same tests first, so
a survivor can never be a test that was failing anyway. Not part of `make test`: it runs the chosen
tests once per mutant, several minutes on two cores.

    python tests/mutants.py            # all mutants
    python tests/mutants.py -k pruner  # those whose name contains "pruner"
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]


OBJECTIVE_VALUES = "tests/test_objective.py"
VIEW = "tests/test_mlflow_view.py"
BF16_STAGE2 = "tests/test_finetune.py::test_bf16_stage2_records_its_precision_and_stays_within_2_percent_of_fp32"
NEVER_BEATEN = (
    "tests/test_outages.py::test_only_the_sweeps_own_trials_are_failed_for_never_beating_and_by_the_databases_clock"
)
MUTANTS = (
    Mutant(
        "MLflow val_acc series logged from train_acc",
        "sweep/objective.py",
        '{k: v for k, v in metrics.items() if k != "epoch"}, step=epoch',
        '{**{k: v for k, v in metrics.items() if k != "epoch"}, "val_acc": metrics["train_acc"]}, step=epoch',
        (f"{OBJECTIVE_VALUES}::test_each_epoch_logs_the_accuracies_of_that_epochs_model",),
    ),
    Mutant(
        "the last epoch kept instead of the best",
        "sweep/objective.py",
        'if self.metrics is None or metrics["val_acc"] > self.metrics["val_acc"]:',
        "if True:",
        (f"{OBJECTIVE_VALUES}::test_the_best_epoch_is_the_argmax_and_its_checkpoint_reproduces_the_record",),
    ),
    Mutant(
        "the trial's val_acc attribute (what the rule reads) set to train_acc",
        "sweep/objective.py",
        '"val_acc": m["val_acc"]}.items():',
        '"val_acc": m["train_acc"]}.items():',
        (f"{OBJECTIVE_VALUES}::test_the_best_epoch_is_the_argmax_and_its_checkpoint_reproduces_the_record",),
    ),
    Mutant(
        "the checkpoint saved from the last epoch, its metrics from the best",
        "sweep/objective.py",
        "            self.metrics, self.timestamp = dict(metrics), timestamp\n            self.state_dict =",
        "            self.metrics, self.timestamp = dict(metrics), timestamp\n"
        "        if True:\n            self.state_dict =",
        (f"{OBJECTIVE_VALUES}::test_the_checkpoint_holds_the_best_epochs_weights",),
    ),
    Mutant(
        "the objective returns train_acc to Optuna",
        "sweep/objective.py",
        'return best.metrics["val_acc"]',
        'return best.metrics["train_acc"]',
        (f"{OBJECTIVE_VALUES}::test_the_best_epoch_is_the_argmax_and_its_checkpoint_reproduces_the_record",),
    ),
    Mutant(
        "cached features multiplied by 0.5",
        "clothing/features.py",
        'return torch.from_numpy(np.ascontiguousarray(np.load(path, mmap_mode="r")[keep]))',
        'return torch.from_numpy(np.ascontiguousarray(np.load(path, mmap_mode="r")[keep])) * 0.5',
        ("tests/test_features.py::test_cached_features_are_the_models_own_pooled_features",),
    ),
    Mutant(
        "best computes test_acc on validation/",
        "sweep/best.py",
        'device, test_dir = str(resolve_device(data.device)), data.data_dir / "test"',
        'device, test_dir = str(resolve_device(data.device)), data.data_dir / "validation"',
        ("tests/test_winner.py::test_test_acc_is_what_predict_gives_with_the_exported_file",),
    ),
    Mutant(
        "the median pruner replaced by no pruning",
        "sweep/study.py",
        'if stage1.pruner == "median"',
        "if False",
        (f"{OBJECTIVE_VALUES}::test_the_median_pruner_stops_trials_early",),
    ),
    Mutant(
        "precision dropped from the feature-cache key",
        "clothing/features.py",
        "precision={precision};",
        "",
        ("tests/test_features.py::test_every_field_of_the_cache_key_matters",),
    ),
    Mutant(
        "engine dropped from the feature-cache key",
        "clothing/features.py",
        "engine={engine};",
        "",
        ("tests/test_features.py::test_every_field_of_the_cache_key_matters",),
    ),
    Mutant(
        "view 1 flipped along the height instead of mirrored",
        "clothing/extract.py",
        "views.append(views[0].flip(-1))",
        "views.append(views[0].flip(-2))",
        ("tests/test_finetune.py::test_the_cache_holds_the_requested_views_each_different",),
    ),
    Mutant(
        "the trunk normalises with the std as the mean",
        "clothing/extract.py",
        "(pixels.float() / 255 - self.mean) / self.std",
        "(pixels.float() / 255 - self.std) / self.std",
        ("tests/test_features.py::test_cached_features_are_the_models_own_pooled_features",),
    ),
    Mutant(
        "the backbone file loaded with weights_only=False",
        "clothing/model.py",
        'torch.load(path, map_location="cpu", weights_only=True)',
        'torch.load(path, map_location="cpu", weights_only=False)',
        ("tests/test_bad_input.py::test_a_backbone_weights_file_that_runs_code_is_refused_without_running_it",),
    ),
    Mutant(
        "the winner rule ranks by -gap",
        "sweep/ranking.py",
        "key=lambda r: (r.gap, -r.val_acc,",
        "key=lambda r: (-r.gap, -r.val_acc,",
        ("tests/test_select.py::test_the_winner_is_the_rule_applied_to_what_mlflow_recorded",),
    ),
    Mutant(
        "the winner rule ranks by val_acc alone",
        "sweep/ranking.py",
        "key=lambda r: (r.gap, -r.val_acc,",
        "key=lambda r: (-r.val_acc, -r.val_acc,",
        ("tests/test_select.py::test_the_winner_is_the_rule_applied_to_what_mlflow_recorded",),
    ),
    Mutant(
        "train_acc is the running train-mode accuracy (a dishonest gap)",
        "clothing/train.py",
        "if train_eval_loader is not None:",
        "if False:",
        ("tests/test_train.py::test_train_acc_is_the_eval_mode_accuracy_on_the_plain_training_data",),
    ),
    Mutant(
        "the sampler seeded per process, not per trial",
        "sweep/study.py",
        "TPESampler(seed=trial_seed(self.seed, trial.number))",
        "TPESampler(seed=self.seed)",
        ("tests/test_study.py::test_a_sweep_killed_mid_trial_resumes_to_its_target_without_repeating_a_configuration",),
    ),
    Mutant(
        "the study lock per process instead of in the database (machines overshoot)",
        "sweep/stores.py",
        "    return DatabaseLock(storage, *sql, study_name, outage_seconds)\n",
        '    if storage.startswith("postgresql") and study_name != "optuna-schema":\n'
        '        return FileLock(Path(f"/tmp/sweep-mutant-{os.getpid()}.lock"))\n'
        "    return DatabaseLock(storage, *sql, study_name, outage_seconds)\n",
        ("tests/test_cluster.py::test_the_study_lock_is_one_lock_for_every_machine_and_dies_with_its_holder",),
    ),
    Mutant(
        "passwords not masked in messages",
        "sweep/stores.py",
        '    """`url` with any password replaced by ***: the form to log, print or store."""\n',
        '    """`url` with any password replaced by ***: the form to log, print or store."""\n    return url\n',
        ("tests/test_cluster.py::test_no_password_reaches_the_record_or_the_terminal",),
    ),
    Mutant(
        "the storage URL logged as a param of the parent run",
        "sweep/config.py",
        "values = {name: value for name, value in self.settings().items() if not SETTINGS[name][1].secret}",
        'values = {name: value for name, value in self.settings().items() if name != "tracking_uri"}',
        (
            "tests/test_settings.py::test_the_parent_runs_params_are_every_setting_but_the_store_urls",
            "tests/test_cluster.py::test_no_password_reaches_the_record_or_the_terminal",
        ),
    ),
    Mutant(
        "Pillow's decompression-bomb error not treated as an unreadable image",
        "clothing/data.py",
        "    except Exception as exc:  # noqa: BLE001",
        "    except (OSError, ValueError) as exc:  # noqa: BLE001",
        ("tests/test_hostile.py::test_a_decompression_bomb_is_an_unreadable_image_everywhere",),
    ),
    Mutant(
        "the cache key hashes file names as text (a non-UTF-8 name crashes it)",
        "clothing/features.py",
        "os.fsencode(os.path.abspath(path))",
        "os.path.abspath(path).encode()",
        ("tests/test_hostile.py::test_names_that_are_not_utf8_work_end_to_end",),
    ),
    Mutant(
        "registering reopens the winner's run (rewrites its end time)",
        "sweep/registry.py",
        "        info = log_pyfunc(model_file, run_id, logged_model.model_id)\n",
        "        with mlflow.start_run(run_id=run_id):\n            pass\n"
        "        info = log_pyfunc(model_file, run_id, logged_model.model_id)\n",
        (f"{VIEW}::test_registering_keeps_run_timing_describes_the_version_and_moves_the_champion_alias",),
    ),
    Mutant(
        "the served model fails the whole request on one non-image",
        "sweep/serving.py",
        '        return None, f"row {row}: not an image Pillow can read ({type(error.__cause__).__name__})"',
        "        raise error",
        ("tests/test_serving.py::test_the_served_champion_answers_images_with_the_labels_predict_gives",),
    ),
    Mutant(
        "predict lists a folder's images unsorted",
        "clothing/inference.py",
        "        images = sorted(\n",
        "        images = list(\n",
        ("tests/test_predict_files.py::test_predict_over_a_folder_writes_one_sorted_row_per_image",),
    ),
    Mutant(
        "predict --tta averages the image with itself, not its mirror",
        "clothing/inference.py",
        "(pooled,) = trunk(pixels.flip(-1) if mirrored else pixels)",
        "(pooled,) = trunk(pixels)",
        (
            "tests/test_predict_files.py::test_batches_engines_and_mirror_views_change_no_label",
            "tests/test_winner.py::test_tta_averages_each_image_with_its_mirror",  # best --tta is predict's
        ),
    ),
    Mutant(
        "a RUNNING trial of the sweep's that never got a heartbeat stays RUNNING forever",
        "sweep/storage.py",
        "            self.record_heartbeat(trial_id)\n",
        "            pass\n",
        (NEVER_BEATEN,),
    ),
    Mutant(
        "another client's study.ask() trial failed as stale for never beating",
        "sweep/storage.py",
        "                    .join(models.TrialSystemAttributeModel)\n"
        "                    .filter(\n"
        "                        models.TrialModel.study_id == study_id,\n"
        "                        models.TrialModel.state == TrialState.RUNNING,\n"
        "                        models.TrialSystemAttributeModel.key == BEATS,\n",
        "                    .filter(\n"
        "                        models.TrialModel.study_id == study_id,\n"
        "                        models.TrialModel.state == TrialState.RUNNING,\n",
        (NEVER_BEATEN,),
    ),
    Mutant(
        "a --jobs worker's first call fails at once in an outage",
        "sweep/study.py",
        "    budget = outage_seconds if reached else 0\n",
        "    budget = 0\n",
        ("tests/test_soak.py::test_workers_ride_out_kills_a_database_restart_and_a_tracking_outage",),
    ),
    Mutant(
        "a --jobs worker's error left to multiprocessing's traceback",
        "sweep/pipeline.py",
        "    except Exception as exc:  # noqa: BLE001 - whatever stopped the worker, in one line\n",
        "    except ZeroDivisionError as exc:\n",
        (
            "tests/test_study.py::test_a_jobs_worker_that_stops_on_an_error_says_why_in_one_line_and_the_main_process_finishes",
        ),
    ),
    Mutant(
        "a trial created without the lock counts only finished trials, not running ones",
        "sweep/study.py",
        "taken = self.finished(others) + sum(t.state == TrialState.RUNNING for t in others)",
        "taken = self.finished(others)",
        ("tests/test_outages.py::test_a_trial_created_without_the_lock_steps_aside_when_others_reached_the_target",),
    ),
    Mutant(
        "the champion alias not moved",
        "sweep/registry.py",
        "    tracker.client.set_registered_model_alias(name, CHAMPION_ALIAS, registered.version)\n",
        "    if registered.version == 1:\n"
        "        tracker.client.set_registered_model_alias(name, CHAMPION_ALIAS, registered.version)\n",
        (f"{VIEW}::test_registering_keeps_run_timing_describes_the_version_and_moves_the_champion_alias",),
    ),
    Mutant(
        "the parent counts pruned trials as failed",
        "sweep/ranking.py",
        '"trials/failed": states.count("FAIL"),',
        '"trials/failed": states.count("FAIL") + states.count("PRUNED"),',
        (f"{VIEW}::test_the_parent_run_summarises_the_study_in_metrics_description_and_params",),
    ),
    Mutant(
        "an old winner's test score left on the parent",
        "sweep/ranking.py",
        "PARENT_TEST_METRIC: math.nan if test_acc is None else test_acc,",
        "**({PARENT_TEST_METRIC: test_acc} if test_acc is not None else {}),",
        (f"{VIEW}::test_the_parent_gets_the_winners_test_acc_once_best_scored_it",),
    ),
    Mutant(
        "a pruned trial tagged COMPLETE",
        "sweep/tracking.py",
        "tags: dict[str, object] = {STATE_TAG: state}",
        'tags: dict[str, object] = {STATE_TAG: "COMPLETE" if state == "PRUNED" else state}',
        (f"{VIEW}::test_pruned_trials_say_pruned_in_a_tag_a_user_can_filter_on_and_in_their_description",),
    ),
    Mutant(
        "a missing data folder checked after the stores are created",
        "sweep/pipeline.py",
        "    splits = load_splits(data_settings.data_dir, data_settings.image_size)\n"
        "    backbone = load_backbone(data_settings.backbone_weights)\n"
        "    tracker = Tracker(stores.tracking_uri)\n",
        "    make_storage(stores.storage)\n"
        "    splits = load_splits(data_settings.data_dir, data_settings.image_size)\n"
        "    backbone = load_backbone(data_settings.backbone_weights)\n"
        "    tracker = Tracker(stores.tracking_uri)\n",
        ("tests/test_bad_input.py::test_run_without_data_says_how_to_get_it_and_creates_no_store",),
    ),
    Mutant(
        "a resumed study takes a changed search space",
        "sweep/pipeline.py",
        "    if recorded is not None and recorded != wanted:",
        "    if False:",
        ("tests/test_sweepfile.py::test_resuming_a_study_with_another_space_is_refused_and_loses_nothing",),
    ),
    Mutant(
        "the sweep file's settings ignored",
        "sweep/cli.py",
        "    ctx.default_map = {**(ctx.default_map or {}), **settings}\n",
        "    ctx.default_map = ctx.default_map or {}\n",
        ("tests/test_sweepfile.py::test_a_sweep_file_becomes_the_studys_distributions_and_the_parent_runs_record",),
    ),
    Mutant(
        "a sweep file's file-only settings (holdout_fold) never reach the config",
        "sweep/cli.py",
        "    return {name: value for name, value in settings.items() if not SETTINGS[name][1].cli}, dimensions\n",
        "    return {}, dimensions\n",
        ("tests/test_holdout.py::test_a_sweep_with_a_held_out_part_records_it_and_refuses_another",),
    ),
    Mutant(
        "a split's digest ignores file sizes",
        "sweep/data.py",
        '        digest.update(str(os.stat(path).st_size).encode() + b"\\n")\n',
        "",
        ("tests/test_lineage.py::test_a_splits_digest_changes_when_a_file_changes",),
    ),
    Mutant(
        "a float option lets nan through",
        "sweep/settings.py",
        "if not math.isfinite(number):",
        "if math.isinf(number):",
        ("tests/test_hostile.py::test_numbers_that_parse_but_make_no_sense_are_usage_errors",),
    ),
    Mutant(
        "the held-out rows are left in the training features",
        "sweep/data.py",
        "        train = train.subset(kept)\n",
        "",
        ("tests/test_holdout.py::test_no_trial_trains_on_a_held_out_image",),
    ),
    Mutant(
        "the folds dealt from the whole of train/, not per class",
        "sweep/data.py",
        "rows = rng.permutation(np.flatnonzero(labels == label))",
        "rows = rng.permutation(len(labels))",
        ("tests/test_holdout.py::test_the_folds_are_stratified_fixed_and_hold_out_every_image_once",),
    ),
    Mutant(
        "early stopping counts a tie with the best epoch as an improvement",
        "clothing/train.py",
        'if metrics["val_acc"] > self.best:',
        'if metrics["val_acc"] >= self.best:',
        ("tests/test_train.py::test_early_stopping_ends_after_patience_epochs_without_a_better_val_acc",),
    ),
    Mutant(
        "stage 2 records bf16 but trains in fp32",
        "sweep/objective.py",
        "autocast=AUTOCAST[recipe.train_precision],",
        "autocast=None,",
        ("tests/test_finetune.py::test_bf16_stage2_records_its_precision_and_stays_within_2_percent_of_fp32",),
    ),
    Mutant(
        "a stage-2 trial of another recipe counted as this one (a new recipe never runs)",
        "sweep/pipeline.py",
        "        return Stage2Recipe.read(trial.params) == recipe\n",
        "        return True\n",
        ("tests/test_finetune.py::test_bf16_stage2_records_its_precision_and_stays_within_2_percent_of_fp32",),
    ),
    Mutant(
        "an older stage-2 trial that ran a retired lever reads as today's recipe",
        "sweep/objective.py",
        "        if any(params.get(name, neutral) != neutral for name, neutral in cls.RETIRED.items()):\n"
        "            return None\n",
        "",
        ("tests/test_finetune.py::test_an_older_stage2_trial_reads_as_the_recipe_it_ran",),
    ),
    Mutant(
        "a stage-2 trial from before a param existed reads as no recipe (its source fine-tuned again)",
        "sweep/objective.py",
        '            elif f.metadata["older"] is not MISSING:',
        "            elif False:",
        ("tests/test_finetune.py::test_an_older_stage2_trial_reads_as_the_recipe_it_ran",),
    ),
    Mutant(
        "a second pass converts the trunk again",
        "clothing/engines.py",
        "    if key not in _LAST_BUILT:",
        "    if True:",
        ("tests/test_features.py::test_the_decode_and_engine_give_the_same_features_run_to_run_from_one_conversion",),
    ),
    Mutant(
        "the sweep's mirror views at 224 px whatever --image-size",
        "sweep/data.py",
        "        image_size=settings.image_size,\n",
        "",
        ("tests/test_image_size.py::test_a_larger_image_size_travels_from_the_features_to_predict",),
    ),
    Mutant(
        "a refused connect under Optuna's StorageInternalError not waited out",
        "sweep/stores.py",
        "    exc = driver_error(exc)\n    if isinstance(exc, DBAPIError)",
        "    if isinstance(exc, DBAPIError)",
        ("tests/test_outages.py::test_a_heartbeat_waits_out_a_stopped_database_instead_of_dying",),
    ),
    Mutant(
        "a live trial another worker failed left with its run RUNNING",
        "sweep/tracking.py",
        "        except BaseException as exc:\n            self.end_trial(run_id, *ending(exc))\n",
        "        except BaseException as exc:\n"
        "            if not isinstance(exc, UpdateFinishedTrialError):\n"
        "                self.end_trial(run_id, *ending(exc))\n",
        ("tests/test_study.py::test_a_live_trial_another_worker_failed_is_stopped_closed_and_replaced",),
    ),
    Mutant(
        "a trial that fails before its run exists records no reason",
        "sweep/objective.py",
        '            trial.set_user_attr("error", f"{type(exc).__name__}: {exc}")\n',
        '            if "mlflow_run_id" in trial.user_attrs:\n'
        '                trial.set_user_attr("error", f"{type(exc).__name__}: {exc}")\n',
        ("tests/test_study.py::test_a_trial_that_fails_before_its_run_exists_still_says_why",),
    ),
    Mutant(
        "orphaned runs of failed trials not closed",
        "sweep/pipeline.py",
        "        close_orphaned_runs(sweep)\n",
        "",
        ("tests/test_study.py::test_a_failed_trials_run_left_running_is_closed_by_the_next_sweep",),
    ),
    Mutant(
        "the logged model's metrics linked at a new timestamp: a second point on the run's curves",
        "sweep/objective.py",
        'self.tracker.link_metrics(run_id, model_id, linked, m["epoch"], best.timestamp)',
        'self.tracker.link_metrics(run_id, model_id, linked, m["epoch"], best.timestamp + 1)',
        (f"{VIEW}::test_every_trials_checkpoint_is_a_logged_model_with_its_best_epochs_metrics",),
    ),
    Mutant(
        "stage 2 pruned by the median of another recipe's curve",
        "sweep/study.py",  # as it was: stage 2 pruned from its second finished trial on
        'MedianPruner(n_startup_trials=5, n_warmup_steps=2)\n        if prune and stage1.pruner == "median"',
        'MedianPruner(n_startup_trials=5 if prune else 1, n_warmup_steps=2)\n        if stage1.pruner == "median"',
        (
            "tests/test_finetune.py::"
            "test_another_recipes_stage_2_on_the_same_study_runs_its_epochs_whatever_the_first_ones_curve",
        ),
    ),
    Mutant(
        "auto trusts oneDNN's bf16 check, which says yes where bf16 is emulated (killed on plain AVX-512 only)",
        "clothing/extract.py",
        'return "bf16" if native_bf16_cpu() else "fp32"',
        'return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"',
        ("tests/test_finetune.py::test_auto_picks_bf16_exactly_where_the_cpu_lists_native_bf16",),
    ),
    Mutant(
        "validation extracted in the training features' bf16, not in the exported model's fp32",
        "sweep/data.py",
        'precision = "exact" if train.precision == "exact" else "fp32"',
        "precision = train.precision",
        (BF16_STAGE2,),
    ),
    Mutant(
        "validation of a bf16 stage 2 under autocast, not as the exported model predicts",
        "clothing/train.py",
        "val_loss, val_acc = _run_epoch(model, val_loader, criterion, device, None)",
        "val_loss, val_acc = _run_epoch(model, val_loader, criterion, device, None, autocast)",
        (BF16_STAGE2,),
    ),
    Mutant(
        "the trained-twice interval resamples the 2N differences of both trainings one by one",
        "bench/accuracy.py",
        "differences = np.mean([scores[n] - scores[baseline(n)] for n in trainings], axis=0)",
        "differences = np.concatenate([scores[n] - scores[baseline(n)] for n in trainings])",
        ("tests/test_front.py::test_a_second_training_that_copies_the_first_leaves_the_interval_as_it_was",),
    ),
)


def copy_tree(destination: Path) -> None:
    """The working tree as git sees it (tracked and untracked-not-ignored files), no venv, no stores."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    ).stdout.split(b"\0")
    for name in filter(None, (n.decode() for n in listed)):
        source = ROOT / name
        if source.is_file():
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def run_tests(tree: Path, tests: tuple[str, ...]) -> tuple[int, str]:
    env = {**os.environ, "PYTHONPATH": str(tree), "SWEEP_HEARTBEAT_SECONDS": "1"}
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    result = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True)
    return result.returncode, (result.stdout + result.stderr).strip().splitlines()[-1:]


def mutate(tree: Path, mutant: Mutant) -> None:
    path = tree / mutant.file
    text = path.read_text()
    count = text.count(mutant.old)
    if count != 1:
        raise SystemExit(f"mutant {mutant.name!r}: expected the code once in {mutant.file}, found it {count} times")
    path.write_text(text.replace(mutant.old, mutant.new))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-k", default="", help="only mutants whose name contains this")
    chosen = [m for m in MUTANTS if parser.parse_args().k in m.name]
    with tempfile.TemporaryDirectory(prefix="mutants-") as tmp:
        baseline = Path(tmp) / "baseline"
        copy_tree(baseline)
        code, tail = run_tests(baseline, tuple(sorted({t for m in chosen for t in m.tests})))
        if code != 0:
            print(f"the unmutated tests fail, so no mutant can be judged: {tail}")
            return 2
        survivors = []
        for index, mutant in enumerate(chosen):
            tree = Path(tmp) / f"mutant{index}"
            copy_tree(tree)
            mutate(tree, mutant)
            started = time.perf_counter()
            code, tail = run_tests(tree, mutant.tests)
            verdict = "killed" if code == 1 else "SURVIVED" if code == 0 else f"error (pytest exit {code})"
            print(f"{verdict:9} {mutant.name}  [{time.perf_counter() - started:.0f} s]  by {', '.join(mutant.tests)}")
            if code != 1:
                survivors.append(mutant.name)
            shutil.rmtree(tree)
    print(f"\n{len(chosen) - len(survivors)} of {len(chosen)} mutants killed")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
