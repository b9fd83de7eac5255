"""The tiny BTX plan with its branches and finetune as jobs of the real local SLURM cluster,
from the seed of the local plan (tests/integration/btx_helpers.py)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import REPO
from tests.integration.btx_helpers import btx_state, run_plan_on, stage_run

pytestmark = pytest.mark.integration


# The first test to ask for the local plan builds it (built_once), which can be this one:
# its set-up then trains the whole plan before the branches go to the cluster.
@pytest.mark.timeout(1200)
def test_tiny_plan_with_branches_as_slurm_jobs(slurm_cluster, local_plan, data_cache, tmp_path):
    seed = btx_state(local_plan[1])["stages"]["seed"]["checkpoint"]
    plan_run = run_plan_on(
        "slurm",
        ["--cluster", str(REPO / "configs/clusters/local_slurm.yaml")],
        seed,
        data_cache,
        tmp_path,
    )
    job_ids = {
        json.loads((stage_run(plan_run, f"branch:{d}") / "state.json").read_text())["job_ids"][0]
        for d in ("code", "prose", "arithmetic")
    }
    assert len(job_ids) == 3  # one SLURM job per branch
