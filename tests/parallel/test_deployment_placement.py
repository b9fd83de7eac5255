"""A placement served on 2 EP ranks: experts moved between ranks (and router rows permuted)
give the contiguous layout's outputs exactly, both equal to a plain-torch MoE reference."""

from __future__ import annotations

import json
import sys

import pytest

from cluster import RunSpec, run_local
from tests.conftest import REPO

pytestmark = pytest.mark.parallel


def test_placement_on_two_expert_parallel_ranks_gives_the_same_outputs(tmp_path):
    entry = [
        sys.executable,
        str(REPO / "tests" / "parallel" / "deployment_ep_check.py"),
        str(tmp_path),
    ]
    assert run_local(RunSpec(tmp_path, 2, entry), stream=False) == 0, (
        tmp_path / "logs" / "rank0.log"
    ).read_text()[-3000:]
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["local_experts"] == 4
        assert got["equal"] and got["max_diff"] == 0.0
        assert got["vs_reference"] < 1e-5, got
