"""The paired benchmarks' statistics (bench/common.py): the median of per-pair ratios with a
percentile bootstrap interval, and the rule that stops measuring."""

from __future__ import annotations

import numpy as np
import pytest

from moe_parallel.bench.common import StopRule, median_ratio_interval


def test_the_interval_covers_the_true_median_of_a_known_distribution():
    # Ratios log-normal around 1.01 (median exp(mu) exactly), spread like a noisy shared host.
    true_median, rng = 1.01, np.random.default_rng(7)
    covered = 0
    for trial in range(60):
        ratios = true_median * np.exp(rng.normal(0.0, 0.05, size=80))
        interval = median_ratio_interval(list(ratios), seed=trial)
        assert interval.low <= interval.median <= interval.high
        covered += interval.low <= true_median <= interval.high
    # A 95% interval misses now and then; the share that covers is near 0.95 (binomial, 60 runs).
    assert covered >= 52, covered


def test_more_pairs_give_a_narrower_interval():
    rng = np.random.default_rng(3)
    few = median_ratio_interval(list(np.exp(rng.normal(0, 0.05, size=20))))
    many = median_ratio_interval(list(np.exp(rng.normal(0, 0.05, size=500))))
    assert many.half_width < few.half_width / 2  # about 1/sqrt(25) expected


def test_a_constant_ratio_gives_a_zero_width_interval():
    interval = median_ratio_interval([1.013] * 25)
    assert (interval.median, interval.low, interval.high) == (1.013, 1.013, 1.013)
    assert interval.half_width == 0.0 and interval.pairs == 25


def test_the_interval_is_deterministic_for_a_seed():
    ratios = list(np.exp(np.random.default_rng(1).normal(0, 0.1, size=30)))
    assert median_ratio_interval(ratios, seed=5) == median_ratio_interval(ratios, seed=5)


def test_no_ratios_is_refused():
    with pytest.raises(ValueError, match="no ratios"):
        median_ratio_interval([])


def test_the_stop_rule_waits_for_pairs_then_a_narrow_interval_or_the_cap():
    rule = StopRule(margin=0.02, max_seconds=100.0, min_pairs=10)
    narrow = [1.0, 1.001, 0.999] * 4
    wide = [0.8, 1.2, 0.9, 1.1, 1.0, 0.7, 1.3] * 2
    assert rule.reason_to_stop(narrow[:9], elapsed_s=1.0) is None  # fewer than min_pairs
    assert rule.reason_to_stop(narrow, elapsed_s=1.0) == "interval"
    assert rule.reason_to_stop(wide, elapsed_s=1.0) is None
    assert rule.reason_to_stop(wide, elapsed_s=100.0) == "time cap"
