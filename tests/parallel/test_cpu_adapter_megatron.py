"""Megatron-core paths that read ``torch.cuda.device_count()``, on 2 CPU ranks under the adapter.

The adapter gives each rank one device (the CPU): ``device_count() == 1`` while
``is_available()`` stays False. With a count of 0, Megatron's own seeding left the RNG tracker
empty (the forced load balance then failed with "cuda rng state expert-parallel-rng is not
added"), and the persistent checkpoint worker divided by zero (rank % device_count()).
The rank program is tests/parallel/cpu_adapter_megatron_check.py.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch

from cluster import RunSpec, run_local
from tests.conftest import REPO

pytestmark = pytest.mark.parallel

SEED = 123
TRACKER = ["data-parallel-rng", "expert-parallel-rng", "model-parallel-rng"]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    run_dir = tmp_path_factory.mktemp("adapter-megatron")
    entry = [sys.executable, str(REPO / "tests" / "parallel" / "cpu_adapter_megatron_check.py")]
    code = run_local(RunSpec(run_dir, 2, [*entry, str(run_dir)]), stream=False)
    assert code == 0, (run_dir / "logs" / "rank0.log").read_text()[-3000:]
    return [json.loads((run_dir / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_each_cpu_rank_sees_one_device_and_no_cuda(ranks):
    for got in ranks:
        assert got["device_count"] == 1
        assert got["cuda_available"] is False


def test_megatron_seeding_then_force_load_balancing_draws_the_expert_parallel_stream(ranks):
    for ep_rank, got in enumerate(r["force_load_balancing"] for r in ranks):
        assert got["ep_rank"] == ep_rank
        assert got["tracker_before_seeding"] == []
        assert got["tracker_after_seeding"] == TRACKER
        # The random logits are the draws of seed + 1024 + 100 * ep_rank (16 tokens x 4 experts).
        stream = torch.Generator().manual_seed(SEED + 1024 + 100 * ep_rank)
        want = torch.randn(16, 4, generator=stream)[0]
        assert got["first_draws"] == [round(float(x), 6) for x in want]
        assert got["routing_equal"] is True
        assert got["probs_max_diff"] < 1e-6
        assert got["weight_grad_norm"] > 0.01
        assert got["weight_grad_max_diff"] < 1e-6
        assert got["cpu_rng_kept"] is True  # the fork restored the default generator
    first = [r["force_load_balancing"]["first_draws"] for r in ranks]
    assert first[0] != first[1]  # one stream per expert-parallel rank


def test_async_save_through_megatrons_persistent_worker_is_loaded_back(ranks):
    for rank, got in enumerate(r["async_save"] for r in ranks):
        assert got["worker_pid_differs"] is True
        assert got["worker_exitcode"] == 0
        assert got["rows"] == [[100.0 * rank + i + 4 * row for i in range(4)] for row in (0, 1)]
        assert got["shared"] == [7.5, 7.5, 7.5]
