"""The paired statistics of an upgrade (method/comparison.py) against SciPy's own implementations,
small-sample edge cases included (no flips, all flips, one image), and the verdict's rules."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import binomtest

from transmiter_deploy.method.comparison import (VerdictRules, compare_labelled, compare_unlabelled,
                                                 correct_per_image, hm_interval, mcnemar_exact,
                                                 paired_difference_interval, verdict, wilson_interval)
from transmiter_deploy.method.evaluation import base_to_novel

TABLES = [(0, 0), (0, 1), (1, 0), (1, 1), (0, 7), (7, 0), (3, 9), (12, 5), (50, 50), (0, 200), (130, 170), (1, 2000)]


@pytest.mark.parametrize("b,c", TABLES)
def test_mcnemar_equals_scipys_binomial_test_of_the_discordant_pairs(b, c):
    expected = 1.0 if b + c == 0 else binomtest(b, b + c, 0.5, alternative="two-sided").pvalue
    assert mcnemar_exact(b, c) == pytest.approx(expected, rel=1e-9, abs=1e-300)


@pytest.mark.parametrize("k,n", [(0, 1), (1, 1), (0, 10), (10, 10), (3, 10), (1, 2), (57, 100), (999, 1000),
                                 (0, 5000), (2500, 5000)])
def test_wilson_equals_scipys_wilson_interval(k, n):
    scipy_interval = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    low, high = wilson_interval(k, n)
    assert low == pytest.approx(scipy_interval.low, abs=1e-12)
    assert high == pytest.approx(scipy_interval.high, abs=1e-12)
    assert 0.0 <= low <= k / n <= high <= 1.0


def test_no_trial_is_the_whole_unit_interval():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    assert paired_difference_interval(0, 0, 0, 0) == (-1.0, 1.0)


@pytest.mark.parametrize("table", [(1, 0, 0, 0), (0, 1, 0, 0), (0, 0, 1, 0), (0, 0, 0, 1), (40, 0, 0, 10),
                                   (0, 25, 25, 0), (0, 50, 0, 0), (0, 0, 50, 0), (80, 3, 9, 8)])
def test_the_paired_interval_holds_its_estimate_and_stays_in_range(table):
    both, before_only, after_only, neither = table
    n = sum(table)
    low, high = paired_difference_interval(*table)
    estimate = (after_only - before_only) / n
    assert -1.0 <= low <= estimate <= high <= 1.0
    if before_only == after_only == 0:  # no discordant pair: the interval is still not a point
        assert low < 0 < high or n == 0
    mirrored = paired_difference_interval(both, after_only, before_only, neither)
    assert mirrored == pytest.approx((-high, -low), abs=1e-12)


def test_the_paired_interval_covers_the_true_difference_about_95_percent_of_the_time():
    """Seeded simulation of correlated right/wrong pairs (accuracy 0.80 before, 0.85 after, 60
    images): Newcombe's interval is known to be close to its nominal level here."""
    rng = np.random.default_rng(7)
    cells = np.array([0.75, 0.05, 0.10, 0.10])  # both, before only, after only, neither
    truth = cells[2] - cells[1]
    covered = 0
    trials = 2000
    for table in rng.multinomial(60, cells, size=trials):
        low, high = paired_difference_interval(*map(int, table))
        covered += low <= truth <= high
    assert 0.93 <= covered / trials <= 0.975


def test_the_hm_interval_is_seeded_and_holds_the_estimate():
    rng = np.random.default_rng(0)
    base, novel = rng.random(120) < 0.9, rng.random(80) < 0.7
    first, again = hm_interval(base, novel, seed=3), hm_interval(base, novel, seed=3)
    assert first == again
    estimate = 2 * base.mean() * novel.mean() / (base.mean() + novel.mean())
    assert first[0] < estimate < first[1]
    assert hm_interval(np.ones(5, bool), np.array([], bool)) == wilson_interval(5, 5)


def test_correctness_per_image_agrees_with_the_accuracy_table():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 10, size=300)
    logits = rng.normal(size=(300, 10)) + 2.0 * np.eye(10)[labels] * (rng.random(300) < 0.6)[:, None]
    right = correct_per_image(logits, labels, 5)
    table = base_to_novel(torch.from_numpy(logits), torch.from_numpy(labels), 5)
    assert 100 * right[labels < 5].mean() == pytest.approx(table["base"], abs=1e-4)
    assert 100 * right[labels >= 5].mean() == pytest.approx(table["novel"], abs=1e-4)


def flips(count: int, of: int) -> dict:
    low, high = wilson_interval(count, of)
    return {"value": count / of, "low": low, "high": high}


RULES = VerdictRules()


@pytest.mark.parametrize("interval,negative,expected", [
    ((0.02, 0.08), flips(1, 400), "better"),
    ((-0.005, 0.03), flips(2, 400), "not worse"),
    ((-0.09, -0.03), flips(4, 400), "worse"),
    ((-0.04, 0.02), flips(4, 400), "cannot tell"),
    ((0.02, 0.08), flips(60, 400), "worse"),        # better on average, but 15% of the images broke
    ((0.0, 0.05), flips(3, 100), "cannot tell"),    # 3% of 100 images: its interval reaches the 2% allowed
    ((-1.0, 0.2), flips(1, 1), "worse"),            # N = 1, broken: a flip rate of [21%, 100%] is above 2%
])
def test_the_verdict_follows_its_rules(interval, negative, expected):
    decided, why = verdict(interval, negative, 400, RULES)
    assert decided == expected, why
    if expected == "cannot tell":
        assert why.startswith("cannot tell with 400 images")


def test_comparing_a_model_with_itself_is_not_worse_and_has_no_flips():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 6, size=500)
    logits = rng.normal(size=(500, 6)) + 3.0 * np.eye(6)[labels]
    result = compare_labelled(logits, logits, labels, 3, RULES)
    assert result["negative_flips"]["count"] == result["positive_flips"]["count"] == 0
    assert result["agreement"]["value"] == 1.0 and result["difference"]["mcnemar_p"] == 1.0
    assert result["verdict"] == "not worse"


def test_a_model_that_breaks_many_images_is_worse_even_if_its_average_holds():
    rng = np.random.default_rng(3)
    labels = np.repeat(np.arange(4), 150)
    before = 4.0 * np.eye(4)[labels] + rng.normal(size=(600, 4))
    after = before.copy()
    swap = rng.permutation(600)[:120]  # 60 images broken, 60 wrong ones mended: same average
    broken, mended = swap[:60], swap[60:]
    before[mended] = -before[mended]
    after[broken] = -after[broken]
    result = compare_labelled(before, after, labels, 2, RULES)
    assert result["difference"]["table"]["before_only"] >= 50
    assert result["verdict"] == "worse" and "negative flips" in result["why"]


def test_one_image_and_all_flips_are_reported_without_failing():
    result = compare_labelled(np.array([[2.0, 0.0, 0.0]]), np.array([[0.0, 2.0, 0.0]]), np.array([0]), 2, RULES)
    assert result["images"] == 1 and result["negative_flips"]["count"] == 1
    assert result["verdict"] == "worse" and result["difference"]["mcnemar_p"] == 1.0
    kept = compare_labelled(np.array([[2.0, 0.0, 0.0]]), np.array([[3.0, 0.0, 0.0]]), np.array([0]), 2, RULES)
    assert kept["verdict"] == "cannot tell" and kept["why"].startswith("cannot tell with 1 image:")
    unlabelled = compare_unlabelled(np.eye(3), np.eye(3)[[1, 1, 2]])
    assert unlabelled["agreement"]["count"] == 2 and unlabelled["prediction_shift"] == pytest.approx(1 / 3)
    assert not unlabelled["labelled"] and unlabelled["verdict"] == "cannot tell"
