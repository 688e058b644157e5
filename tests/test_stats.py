"""benchmarks/stats.py: the estimators every table in docs/results.md reports, against hand-computed values.

rliable is a benchmarks-only dependency (benchmarks/requirements.txt); CI installs it, a bare checkout skips these."""
import os
import sys

import numpy as np
import pytest

pytest.importorskip("rliable")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import stats  # noqa: E402


def test_iqm_is_the_mean_of_the_middle_half():
    # 5 runs: the 25 % trimmed mean drops int(0.25 * 5) = 1 run at each end -> mean(0.5, 0.6, 0.7)
    centre, low, high = stats.iqm([0.9, 0.1, 0.6, 0.5, 0.7], reps=500)
    assert centre == pytest.approx(0.6)
    assert 0.1 <= low <= centre <= high <= 0.9
    # 8 runs: 2 dropped at each end -> mean(3, 4, 5, 6)
    assert stats.iqm([8, 1, 7, 2, 6, 3, 5, 4], reps=500)[0] == pytest.approx(4.5)


def test_probability_of_improvement_counts_ties_as_half():
    # x = 1, 5, 6 against y = 2, 3: 1 beats none, 5 and 6 beat both -> 4 of 6 pairs
    assert stats.probability_of_improvement([1, 5, 6], [2, 3], reps=200)[0] == pytest.approx(4 / 6)
    # 1 < 2 (0), 2 = 2 (one half each), 3 > 2 (1), over y = 2, 2, 2 -> (0 + 1.5 + 3) / 9
    assert stats.probability_of_improvement([1, 2, 3], [2, 2, 2], reps=200)[0] == pytest.approx(0.5)
    # every run of x beats every run of y, in every resample too
    assert stats.probability_of_improvement([3, 4], [1, 2], reps=200) == pytest.approx((1.0, 1.0, 1.0))


def test_intervals_are_reproducible_and_leave_numpys_generator_alone():
    # rliable draws its resamples from numpy's global generator: the CIs must not depend on what ran before, and
    # computing them must not move the caller's random stream
    x, y = [0.905, 0.896, 0.839, 0.880, 0.874], [0.784, 0.917, 0.865, 0.921, 0.852]
    np.random.seed(123)
    expected_next = np.random.rand()
    np.random.seed(123)
    first = stats.probability_of_improvement(x, y), stats.iqm(x)
    assert np.random.rand() == expected_next
    np.random.seed(7)
    np.random.rand(1000)
    assert (stats.probability_of_improvement(x, y), stats.iqm(x)) == first


def test_table_reports_the_probability_in_the_asked_direction():
    rows = [dict(arm=arm, seed=str(seed), iteration="390", env_steps="19968000", eval_success=str(value))
            for arm, values in (("default", [0.80, 0.82, 0.84]), ("candidate", [0.90, 0.91, 0.92]))
            for seed, value in enumerate(values, start=1)]
    improves = stats.table(rows, "arm", "eval_success", improves_on="default")
    assert "| default | 82.0 % [" in improves and "80.0-84.0 (n=3)" in improves
    assert "P(arm > default)" in improves and "| candidate | 1.00 [1.00, 1.00] |" in improves
    baseline = stats.table(rows, "arm", "eval_success", baseline="default")
    assert "P(default > arm)" in baseline and "| candidate | 0.00 [0.00, 0.00] |" in baseline
    with pytest.raises(SystemExit, match="not one of the arm values"):
        stats.table(rows, "arm", "eval_success", baseline="happo")


def test_arms_with_other_batches_line_up_by_env_steps_not_iterations():
    # half the batch (256 envs) reaches 10 M at iteration 390, where the default is at 20 M: keyed by iteration, a
    # candidate's 10 M column would sit under the default's 20 M
    rows = [dict(arm=arm, seed="1", iteration=str(iteration), env_steps=str(steps), eval_success=str(value))
            for arm, points in (("default", [(195, 9_984_000, 0.3), (390, 19_968_000, 0.8)]),
                                ("half_batch", [(390, 9_984_000, 0.6), (781, 19_993_600, 0.9)]))
            for iteration, steps, value in points]
    lines = stats.table(rows, "arm", "eval_success").splitlines()
    assert lines[0] == "| arm | 10.0 M | 20.0 M |"
    assert lines[2].startswith("| default | 30.0 % [") and "| 80.0 % [" in lines[2]
    assert lines[3].startswith("| half_batch | 60.0 % [") and "| 90.0 % [" in lines[3]
