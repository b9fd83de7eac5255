"""Expert buffering and placement on a *recorded* routing trace (moectl generate --trace of the
tiny model): the buffer's counts equal the test's own simulation of the policy in every MoE
layer, and the greedy placement's max/mean rank load is no worse than the contiguous default."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.conftest import TEST_DATA, TINY
from tests.unit.test_moe_deployment import simulate

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def recorded_trace(tmp_path_factory, data_cache) -> Path:
    from moe_parallel.launch_run import launch_local, plan_train
    from moe_parallel.serve.cli import generate_command

    root = tmp_path_factory.mktemp("deploy")
    overrides = [
        *TEST_DATA,
        f"data.cache_dir={data_cache}",
        "log.tensorboard=false",
        "train.steps=2",
        "train.warmup_steps=1",
        "checkpoint.interval=2",
    ]
    launch = plan_train(TINY, overrides, str(root / "runs"), None, None)
    assert launch_local(launch, stream=False) == 0
    checkpoint = launch.run_dir / "checkpoints" / "step_00000002"
    trace = root / "trace.npz"
    assert (
        generate_command(
            str(checkpoint),
            "def main(argv):\n    return",
            6,
            1,
            [],
            runs=str(root / "serve"),
            trace=str(trace),
        )
        == 0
    )
    return trace


def test_buffering_and_placement_on_a_recorded_trace(recorded_trace):
    from moe_parallel.monitor.routing_trace import load_trace
    from moe_parallel.serve.buffering import replay_trace
    from moe_parallel.serve.placement import (
        anti_correlation_placement,
        batch_loads,
        contiguous_placement,
        greedy_placement,
        imbalance,
    )

    trace = load_trace(recorded_trace)
    E = trace.num_experts
    assert len(trace.meta["forwards"]) == 6 and len(trace.layers) >= 1
    for layer in trace.layers:
        cut = list(trace.forwards(layer))
        for budget in range(1, E + 1):
            stats = replay_trace(cut, budget)
            assert (stats.hits, stats.misses) == simulate([np.unique(b) for b in cut], budget)
        loads = batch_loads(cut, E)
        before = imbalance(loads, contiguous_placement(E), 2)
        greedy = imbalance(loads, greedy_placement(loads.mean(0), 2), 2)
        anti = imbalance(loads, anti_correlation_placement(loads, 2), 2)
        print(
            f"layer {layer}: max/mean total {before['total_max_over_mean']:.3f} -> greedy "
            f"{greedy['total_max_over_mean']:.3f}, anti {anti['total_max_over_mean']:.3f}"
        )
        # E=4 on 2 ranks: greedy pairs the largest with the smallest, the best split there is.
        assert greedy["total_max_over_mean"] <= before["total_max_over_mean"] + 1e-12
