"""What the terminal shows: one number format, a trials table that fits 120 columns (--wide for all of
it), and progress that leaves a log file readable."""

import re

from sweep_helpers import output_of, sweep

from clothing.features import cached_features
from clothing.model import load_backbone
from clothing.progress import progress
from sweep.ranking import TrialRecord, format_params, format_table, record_rows

RUN_ID = "0123456789abcdef0123456789abcdef"


def recipe_records() -> list[TrialRecord]:
    """Stage-1 trials and a stage 2 as the default recipe leaves them."""
    head = [
        TrialRecord(n, "COMPLETE", {"lr": lr, "size_inner": size, "dropout": 0.2}, 5, 0.93, 0.86, RUN_ID)
        for n, lr, size in [(0, 0.04828386386096978, 100), (1, 0.00222, 1000), (2, 0.0001, 10)]
    ]
    stage2 = {"lr": 1e-4, "size_inner": 100, "dropout": 0.2, "source_trial": 0, "finetune_blocks": 3, "epochs": 6}
    stage2 |= {"average": "none", "schedule": "constant", "label_smoothing": 0.0}
    stage2 |= {"train_precision": "bf16", "patience": 2}
    return [*head, TrialRecord(0, "COMPLETE", stage2, 3, 0.979, 0.894, RUN_ID, stage="finetune")]


def test_a_parameter_has_one_format_whatever_its_size():
    assert format_params({"lr": 0.04828386386096978, "size_inner": 100}) == "lr 0.0483  size_inner 100"
    assert format_params({"lr": 0.00222, "dropout": 0.0}) == "lr 0.00222  dropout 0"
    table = format_table(record_rows(recipe_records()))
    assert "0.04828" not in table and not re.search(r"\de-\d", table)  # neither 17 digits nor 2.22e-03
    assert re.search(r"\b0\.0483\b", table) and re.search(r"\b0\.00222\b", table)


def test_the_table_fits_120_columns_and_says_shared_settings_once():
    records = recipe_records()
    lines = format_table(record_rows(records, records[-1])).splitlines()
    assert max(map(len, lines)) <= 120
    # stage 2's recipe is one line above the table, not columns of "-" in every stage-1 row
    above = lines[: next(i for i, line in enumerate(lines) if line.split()[0] == "trial")]
    shared = {line.split(":")[0].strip(): line for line in above if ":" in line}
    shared["stage 2"] += " ".join(line for line in above if ":" not in line)
    assert set(shared) == {"stage 2", "all trials"}
    for setting in ("finetune_blocks 3", "epochs 6", "train_precision bf16", "patience 2", "source_trial 0"):
        assert setting in shared["stage 2"]
    assert "dropout 0.2" in shared["all trials"]
    header = lines[len(above)].split()
    assert header == ["trial", "stage", "state", "lr", "size_inner", "best_epoch", "train_acc", "val_acc", "gap"]
    assert lines[-1].startswith("* finetune-000")  # rows in the order given, the winner starred
    assert RUN_ID not in "\n".join(lines)


def test_wide_shows_every_column_with_the_run_ids():
    records = recipe_records()
    lines = format_table(record_rows(records), wide=True).splitlines()
    header = lines[0].split()
    assert {"finetune_blocks", "train_precision", "patience", "dropout", "mlflow_run_id"} <= set(header)
    assert all(RUN_ID in line for line in lines[1:])
    assert " - " in lines[1]  # a stage-1 row has no stage-2 settings


def test_the_commands_print_the_compact_table_and_wide_on_request(swept):
    compact = sweep("trials", stores=swept.stores)
    wide = sweep("trials", "--wide", stores=swept.stores)
    assert compact.exit_code == wide.exit_code == 0, output_of(compact) + output_of(wide)
    assert max(map(len, compact.output.splitlines())) <= 120
    assert "mlflow_run_id" in wide.output and "mlflow_run_id" not in compact.output
    best = sweep("best", "--wide", stores=swept.stores)
    assert best.exit_code == 0 and "mlflow_run_id" in best.output, output_of(best)


def test_progress_off_a_terminal_is_one_line_per_pass(train_set, tiny_weights, tmp_path, capfd):
    with progress(5, "predict") as bar:
        for _ in range(5):
            bar.update(1)
    cached_features(train_set, load_backbone(tiny_weights), tmp_path / "cache", progress=True)
    err = capfd.readouterr().err
    assert "\r" not in err
    lines = err.strip().splitlines()
    assert lines[0].startswith("predict: 5 img in ") and lines[0].endswith(" img/s)")
    assert len(lines) == 2 and lines[1].startswith(f"features train: {len(train_set)} img in "), err
