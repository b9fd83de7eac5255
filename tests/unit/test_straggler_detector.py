"""The straggler decision (moe_parallel/monitor/stragglers.py): per-step ratio to the ranks'
lower median, median of a rank's ratios over the window, threshold; start and end."""

from __future__ import annotations

import pytest

from moe_parallel.monitor.stragglers import StragglerDetector
from moe_parallel.runtime import faults


def feed(detector, steps):
    return [detector.update(compute) for compute in steps]


def test_nobody_before_the_window_is_full():
    d = StragglerDetector(threshold=0.2, window=4)
    updates = feed(d, [[1.0, 3.0]] * 3)
    assert all(u.current == {} for u in updates)
    u = d.update([1.0, 3.0])
    assert u.current == {1: pytest.approx(3.0)} and u.started == [1] and u.ended == []


def test_compared_with_the_lower_median_of_the_ranks():
    # Two ranks: the slow one is compared with the other (1.5x), not with their mean (1.2x).
    d = StragglerDetector(threshold=0.3, window=1)
    assert d.update([2.0, 3.0]).current == {1: pytest.approx(1.5)}
    # Five ranks: lower median 1.0; only the 1.5 s rank is above 1.3x.
    d = StragglerDetector(threshold=0.3, window=1)
    assert d.update([1.0, 1.0, 1.5, 1.2, 0.9]).current == {2: pytest.approx(1.5)}


def test_threshold_is_strict():
    d = StragglerDetector(threshold=0.25, window=1)
    assert d.update([1.0, 1.25]).current == {}
    assert d.update([1.0, 1.2501]).current == {1: pytest.approx(1.2501)}


def test_one_slow_step_is_not_a_straggler_and_one_fast_step_does_not_end_one():
    d = StragglerDetector(threshold=0.2, window=3)
    ups = feed(d, [[1.0, 1.0], [1.0, 5.0], [1.0, 1.0], [1.0, 1.0]])
    assert all(u.current == {} for u in ups)  # a single spike: median ratio over 3 steps is 1
    ups = feed(d, [[1.0, 2.0], [1.0, 2.0]])
    assert ups[-1].started == [1] and ups[-1].current == {1: pytest.approx(2.0)}
    u = d.update([1.0, 1.0])  # ratios (2, 2, 1): median 2, still a straggler
    assert u.current == {1: pytest.approx(2.0)} and u.started == [] and u.ended == []
    u = d.update([1.0, 1.0])  # ratios (2, 1, 1): median 1: ended
    assert u.current == {} and u.ended == [1]


def test_window_median_is_reported_and_starts_are_reported_once():
    d = StragglerDetector(threshold=0.2, window=3)
    ups = feed(d, [[1.0, 1.5, 1.0], [1.0, 2.0, 1.0], [1.0, 3.0, 1.0], [1.0, 4.0, 1.0]])
    assert [u.started for u in ups] == [[], [], [1], []]
    assert ups[2].current == {1: pytest.approx(2.0)}
    assert ups[3].current == {1: pytest.approx(3.0)}


def test_zero_compute_ranks_do_not_divide_by_zero():
    d = StragglerDetector(threshold=0.2, window=1)
    assert d.update([0.0, 0.0]).current == {}


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError, match="threshold"):
        StragglerDetector(threshold=0.0, window=3)
    with pytest.raises(ValueError, match="window"):
        StragglerDetector(threshold=0.2, window=0)


def test_monitor_fault_kinds_parse_and_bad_ones_are_refused():
    assert faults.parse_fault("slow:rank=1:ms=300") == ("slow", {"rank": 1, "ms": 300})
    assert faults.parse_fault("route_one:expert=2") == ("route_one", {"expert": 2})
    assert faults.parse_fault("route_uniform") == ("route_uniform", {})
    assert faults.parse_fault("kill:rank=1:step=7") == ("kill", {"rank": 1, "step": 7})
    for bad, usage in [
        ("slow:rank=1", "slow:rank=N:ms=N"),
        ("slow:rank=1:ms=3:step=2", "slow"),
        ("route_one", "route_one:expert=N"),
        ("route_uniform:expert=1", "route_uniform"),
    ]:
        with pytest.raises(ValueError, match=f"expected {usage}"):
            faults.parse_fault(bad)
