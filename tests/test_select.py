import pytest

from sweep.select import TrialRecord, eligible, select_winner


def record(number, val_acc, train_acc, state="COMPLETE"):
    return TrialRecord(number=number, state=state, params={}, best_epoch=1, train_acc=train_acc, val_acc=val_acc)


def test_smallest_gap_within_tolerance_of_the_best_wins():
    records = [record(0, 0.85, 0.99), record(1, 0.84, 0.88), record(2, 0.80, 0.80)]
    assert select_winner(records, tolerance=0.02).number == 1  # 2 has gap 0 but is 0.05 behind


def test_a_diverged_trial_with_a_tiny_gap_never_wins():
    diverged = record(3, 0.10, 0.10)  # learned nothing: zero gap
    records = [record(0, 0.85, 0.95), diverged]
    assert select_winner(records).number == 0
    assert diverged not in eligible(records)


def test_only_complete_trials_compete():
    records = [record(0, 0.90, 0.90, state="PRUNED"), record(1, 0.80, 0.95), record(2, 0.95, 0.95, state="FAIL")]
    assert select_winner(records).number == 1


def test_ties_go_to_higher_val_acc_then_lower_number():
    assert select_winner([record(4, 0.84, 0.86), record(2, 0.85, 0.87)]).number == 2  # same gap, higher val
    assert select_winner([record(7, 0.85, 0.87), record(5, 0.85, 0.87)]).number == 5  # full tie: lower number


def test_tolerance_zero_means_best_accuracy_wins():
    assert select_winner([record(0, 0.85, 0.99), record(1, 0.84, 0.84)], tolerance=0.0).number == 0


def test_no_complete_trial_means_no_winner():
    assert select_winner([record(0, 0.9, 0.9, state="PRUNED")]) is None
    with pytest.raises(ValueError):
        select_winner([record(0, 0.9, 0.9)], tolerance=-1)
