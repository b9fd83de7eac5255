"""The tiny BTX plan with its branches and finetune as jobs of the real local Ray cluster, from
the seed of the local plan (tests/integration/btx_helpers.py)."""

from __future__ import annotations

import pytest

from tests.integration.btx_helpers import btx_state, run_plan_on

pytestmark = pytest.mark.integration


# The first test to ask for the local plan builds it (built_once), which can be this one:
# its set-up then trains the whole plan before the branches go to the cluster.
@pytest.mark.timeout(1200)
def test_tiny_plan_with_branches_as_ray_jobs(ray_cluster, local_plan, data_cache, tmp_path):
    seed = btx_state(local_plan[1])["stages"]["seed"]["checkpoint"]
    run_plan_on(
        "ray",
        ["ray.address=http://127.0.0.1:8265"],
        seed,
        data_cache,
        tmp_path,
        env=dict(ray_cluster.env()),
    )
