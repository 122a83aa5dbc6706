"""Continual-learning metrics against hand-computed values (formulas in harness/metrics.py)."""

import numpy as np
import pytest

from harness.metrics import acc, as_matrix, bwt, forgetting, fwt, learn_gains, learning_accuracy, not_learned, summarize

# Rows: stage 0 (base) .. 3; columns: tasks 1..3. Task 1 recovers at stage 2 (0.95 > 0.9).
R3 = as_matrix([[0.2, 0.1, 0.3], [0.9, 0.2, 0.3], [0.95, 0.8, 0.4], [0.6, 0.5, 0.9]])


def test_acc_is_mean_of_last_row():
    assert acc(R3) == pytest.approx((0.6 + 0.5 + 0.9) / 3)


def test_bwt_compares_final_with_just_after_training():
    # ((0.6 - 0.9) + (0.5 - 0.8)) / 2
    assert bwt(R3) == pytest.approx(-0.3)


def test_fwt_compares_one_stage_early_with_base_model():
    # ((R[1,2] - b_2) + (R[2,3] - b_3)) / 2 = ((0.2 - 0.1) + (0.4 - 0.3)) / 2
    assert fwt(R3) == pytest.approx(0.1)


def test_forgetting_uses_best_of_stages_1_to_T_minus_1():
    # task 1: max(0.9, 0.95) - 0.6 = 0.35 ; task 2: max(0.2, 0.8) - 0.5 = 0.3
    assert forgetting(R3) == pytest.approx(0.325)
    assert forgetting(R3) != pytest.approx(-bwt(R3))


def test_forgetting_excludes_stage_zero():
    R = as_matrix([[0.9, 0.9], [0.5, 0.1], [0.4, 0.8]])
    # Only stage 1 counts for task 1: 0.5 - 0.4, although the base model scored 0.9.
    assert forgetting(R) == pytest.approx(0.1)


def test_single_task_sequence_has_only_acc():
    R = as_matrix([[0.1], [0.8]])
    assert summarize(R) == {"ACC": pytest.approx(0.8), "BWT": None, "FWT": None, "forgetting": None, "LA": 0.8}


def test_fwt_undefined_when_future_tasks_not_evaluated():
    R = as_matrix([[0.2, 0.1], [0.9, None], [0.7, 0.8]])
    assert fwt(R) is None
    assert bwt(R) == pytest.approx(-0.2)


def test_forgetting_skips_stages_where_task_was_not_evaluated():
    R = as_matrix([[0.2, 0.1, 0.0], [0.9, None, None], [0.8, 0.7, None], [0.5, 0.6, 0.9]])
    # task 1: max(0.9, 0.8) - 0.5 = 0.4 ; task 2: only stage 2 seen: 0.7 - 0.6 = 0.1
    assert forgetting(R) == pytest.approx(0.25)


def test_missing_final_score_makes_acc_undefined():
    R = as_matrix([[0.2, 0.1], [0.9, 0.1], [None, 0.8]])
    assert acc(R) is None


def test_shape_is_checked():
    with pytest.raises(ValueError):
        acc(np.zeros((3, 3)))


def test_forgetting_is_na_when_a_stage_it_maximises_over_was_not_evaluated():
    """diagonal_final leaves R[l, j] for j < l < T out: forgetting is n/a, not a max over fewer stages; BWT stays defined."""
    import numpy as np

    from harness.metrics import bwt, forgetting

    nan = float("nan")
    R = np.array([[0.1, 0.1, 0.1], [0.9, nan, nan], [nan, 0.8, nan], [0.5, 0.6, 0.7]])
    assert forgetting(R) is None and bwt(R) == pytest.approx(((0.5 - 0.9) + (0.6 - 0.8)) / 2)
    R[2, 0] = 0.95  # the full row-2 cell for task 1 is there now: max(0.9, 0.95) - 0.5 and 0.8 - 0.6
    assert forgetting(R) == pytest.approx(((0.95 - 0.5) + (0.8 - 0.6)) / 2)


def test_learning_accuracy_is_the_mean_of_each_tasks_own_stage_score():
    R = as_matrix([[0.2, 0.3, 0.4], [0.9, 0.3, 0.5], [0.6, 0.8, 0.5], [0.5, 0.7, 0.35]])
    assert learning_accuracy(R) == pytest.approx((0.9 + 0.8 + 0.35) / 3)
    assert learn_gains(R) == [pytest.approx(0.7), pytest.approx(0.5), pytest.approx(-0.05)]
    assert not_learned(R, 0.05) == [2]  # task 3 never beat its base score: its low final score is not forgetting
    assert not_learned(R, 0.6) == [1, 2]
    R[2, 1] = np.nan
    assert learning_accuracy(R) is None  # a missing own-stage score: n/a, never guessed


def test_not_learned_is_undefined_without_a_base_row():
    R = as_matrix([[None, None], [0.9, None], [0.5, 0.2]])  # diagonal_final: no stage 0
    assert not_learned(R, 0.05) is None
