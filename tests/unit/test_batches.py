"""Which samples each data-parallel rank reads for a step: the same global batch for any DP."""

from __future__ import annotations

import pytest
import torch

from moe_parallel.runtime.faults import parse_fault
from moe_parallel.train.batches import StepBatches


def _ids(dp_size: int, step: int, gbs=8, mbs=2) -> list[list[int]]:
    per_rank = []
    for rank in range(dp_size):
        b = StepBatches([], gbs, mbs, rank, dp_size, torch.device("cpu"))
        per_rank.append([i for m in range(b.num_microbatches) for i in b.sample_ids(step, m)])
    return per_rank


@pytest.mark.parametrize("dp", [1, 2, 4])
def test_global_batch_is_the_same_set_for_any_dp(dp):
    for step in (0, 3):
        ranks = _ids(dp, step)
        flat = sorted(i for r in ranks for i in r)
        assert flat == list(range(step * 8, step * 8 + 8))
        assert all(len(r) == 8 // dp for r in ranks)


def test_micro_batches_keep_their_content_across_dp():
    # Micro-batch m of DP rank r is micro-batch m * D + r of the 1-rank run: the same samples
    # are grouped together, so per-micro-batch router losses are layout independent.
    one = StepBatches([], 8, 2, 0, 1, torch.device("cpu"))
    one_mbs = [list(one.sample_ids(1, m)) for m in range(4)]
    two = [StepBatches([], 8, 2, r, 2, torch.device("cpu")) for r in range(2)]
    two_mbs = [list(two[r].sample_ids(1, m)) for m in range(2) for r in range(2)]
    assert sorted(one_mbs) == sorted(two_mbs)


def test_collate_stacks_samples(tmp_path):
    data = [
        {
            "tokens": torch.full((4,), i),
            "labels": torch.full((4,), i + 1),
            "loss_mask": torch.ones(4),
            "position_ids": torch.arange(4),
        }
        for i in range(8)
    ]
    b = StepBatches(data, 8, 2, 1, 2, torch.device("cpu"))
    first = next(b.micro_batches(0))
    assert first["tokens"][:, 0].tolist() == [2, 3]
    assert first["labels"].shape == (2, 4)


def test_fault_spec_is_checked():
    assert parse_fault("kill:rank=1:step=7") == ("kill", {"rank": 1, "step": 7})
    assert parse_fault("kill_in_save:rank=0:step=5") == ("kill_in_save", {"rank": 0, "step": 5})
    assert parse_fault("hang:rank=1:step=2") == ("hang", {"rank": 1, "step": 2})
    for bad in ("freeze:rank=1:step=2", "kill:rank=1", "kill:rank=x:step=2"):
        with pytest.raises(ValueError, match="MOE_PARALLEL_FAULT"):
            parse_fault(bad)
