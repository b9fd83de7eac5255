"""Dead experts (moe_parallel/monitor/expert_load.py): no token for dead_expert_steps
consecutive steps; reported once when they die and once when they get tokens again."""

from __future__ import annotations

import pytest

from moe_parallel.monitor.expert_load import DeadExperts
from moe_parallel.train.moe_stats import imbalance


def test_dead_after_exactly_n_empty_steps_then_revived():
    d = DeadExperts(dead_expert_steps=3)
    counts = {0: [10.0, 0.0, 5.0, 0.0], 2: [4.0, 4.0, 4.0, 4.0]}
    ups = [d.update(counts) for _ in range(3)]
    assert [u.dead for u in ups] == [{}, {}, {0: [1, 3]}]
    assert ups[2].died == {0: [1, 3]} and ups[2].revived == {}
    u = d.update(counts)
    assert u.dead == {0: [1, 3]} and u.died == {} and u.revived == {}
    u = d.update({0: [10.0, 1.0, 5.0, 0.0], 2: [4.0, 4.0, 4.0, 4.0]})
    assert u.dead == {0: [3]} and u.revived == {0: [1]} and u.died == {}


def test_one_token_resets_the_count():
    d = DeadExperts(dead_expert_steps=2)
    assert d.update({0: [1.0, 0.0]}).dead == {}
    assert d.update({0: [1.0, 1.0]}).dead == {}
    assert d.update({0: [1.0, 0.0]}).dead == {}
    assert d.update({0: [1.0, 0.0]}).dead == {0: [1]}


def test_changed_expert_count_and_bad_steps_are_refused():
    d = DeadExperts(dead_expert_steps=1)
    d.update({0: [1.0, 0.0]})
    with pytest.raises(ValueError, match="3 experts this step, 2 before"):
        d.update({0: [1.0, 0.0, 0.0]})
    with pytest.raises(ValueError, match="dead_expert_steps must be >= 1"):
        DeadExperts(0)


def test_imbalance_is_max_over_mean():
    assert imbalance({0: [8.0, 0.0, 0.0, 0.0], 1: [2.0, 2.0, 2.0, 2.0]}) == {0: 4.0, 1: 1.0}
