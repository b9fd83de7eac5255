"""The Ray backend's pure logic: whether a placement group fits, profile checks."""

from __future__ import annotations

import pytest

from cluster.profile import ProfileError, load_profile
from cluster.ray_backend import placeable
from cluster.registry import Restart
from cluster.restart_policy import refuse_restart

NODES = [{"ip": "a", "resources": {"CPU": 2.0}}, {"ip": "b", "resources": {"CPU": 2.0, "GPU": 1.0}}]


@pytest.mark.parametrize(
    "bundle,count,strategy,fits",
    [
        ({"CPU": 1.0}, 4, "PACK", True),
        ({"CPU": 1.0}, 5, "PACK", False),
        ({"CPU": 1.0}, 3, "STRICT_PACK", False),
        ({"CPU": 1.0}, 2, "STRICT_PACK", True),
        ({"CPU": 1.0}, 2, "STRICT_SPREAD", True),
        ({"CPU": 1.0}, 3, "STRICT_SPREAD", False),
        ({"CPU": 3.0}, 1, "SPREAD", False),
        ({"CPU": 1.0, "GPU": 1.0}, 1, "PACK", True),
        ({"CPU": 1.0, "GPU": 1.0}, 2, "PACK", False),
    ],
)
def test_placement_group_fits(bundle, count, strategy, fits):
    assert placeable(NODES, bundle, count, strategy) is fits


def test_ray_profile_errors_name_the_field():
    with pytest.raises(ProfileError, match=r"ray.strategy: Input should be 'PACK'"):
        load_profile(None, ["ray.strategy=PAKC"])
    with pytest.raises(ProfileError, match=r"ray.adress: unknown key; did you mean 'address'"):
        load_profile(None, ["ray.adress=http://x:8265"])
    profile = load_profile(None, ["ray.gpus_per_rank=1", "ray.cpus_per_rank=4"]).ray
    assert profile.bundle() == {"CPU": 4.0, "GPU": 1.0}


def test_restart_policy_is_shared():
    assert refuse_restart("rank 1 on x failed: its node was lost", 5, [], 0) is not None
    before = [Restart("t", "rank 1 on x failed: its node was lost", "s.0", "failed", 5)]
    assert "would loop" in refuse_restart("rank 1 on x failed: its node was lost", 5, before, 3)
    assert refuse_restart("rank 1 on x failed: its node was lost", 9, before, 3) is None
