"""The per-op step-time model against a measured step on one CPU rank (moe_tiny, EP1).

The profile is calibrated here (GEMM tables, op latency, host time per layer and step from the
micro model, the step's memory bandwidth from the mid model); the collectives do not enter a
one-rank step, so their links are placeholders and their host time is not fitted. The bound is generous, a factor of 3 either way: the test machine is shared with
other sessions' runs (load averages of 17 to 29 on 2 cores were seen while this was written, and
this step's median moved between 0.25 and 0.62 s within the hour). It still fails a model that
drops the host time (about 3/4 of this step on CPU) or miscounts the GEMMs by an order of
magnitude. The full table and the 15% goal live in benchmarks/planner_accuracy.py.
"""

from __future__ import annotations

import pytest

from moe_parallel.bench.calibrate import measure_profile
from moe_parallel.bench.planner_accuracy import run_case
from moe_parallel.plan.hardware import COLLECTIVES, Link

pytestmark = pytest.mark.parallel


def test_one_rank_step_is_predicted_within_a_factor_of_3():
    links = {name: Link(1e-4, 1e9) for name in COLLECTIVES}
    hw = measure_profile(2, "test CPU", links=links)
    assert hw.layer_host_s > 0 and hw.memory_bandwidth > 0 and hw.collective_host_s == 0
    case = run_case("configs/tiny/moe_tiny.yaml", "1 rank EP1", hw, repeats=6)
    assert case.measured_s > 0
    assert case.measured_s / 3 < case.predicted_s < 3 * case.measured_s, case
