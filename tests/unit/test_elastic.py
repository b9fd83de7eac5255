"""Elastic recovery's pure logic: the sizes a config may shrink to, the refusals before anything
starts, the replica count for a capacity, and the placement of a shrunk Ray group."""

from __future__ import annotations

import pytest

from cluster.elastic import ElasticSpec
from cluster.env import DATA_PARALLEL_ENV
from cluster.ray_backend import bundles_that_fit
from cluster.ray_driver import pinned_bundles
from moe_parallel.config import ConfigError, load_config
from moe_parallel.config.recovery import attempt_config, elastic_sizes, elastic_spec
from moe_parallel.launch_run import check_backend
from tests.conftest import TINY

DP4 = ["parallel.data=4", "parallel.expert=1", "recovery.mode=elastic"]


def test_sizes_keep_the_global_batch_and_the_model_parallel_shape():
    cfg = load_config(TINY, DP4)  # global batch 8, micro-batch 2
    sizes, refused = elastic_sizes(cfg)
    assert sizes == [4, 2, 1]
    assert list(refused) == [3] and "train.global_batch_size=8" in refused[3]
    spec = elastic_spec(cfg)
    assert (spec.ranks_per_replica, spec.replica_counts) == (1, (4, 2, 1))
    tp2 = load_config(
        TINY, [*DP4, "parallel.tensor=2", "parallel.sequence_parallel=true", "parallel.data=2"]
    )
    assert elastic_spec(tp2).ranks_per_replica == 2 and elastic_spec(tp2).replica_counts == (2, 1)
    assert elastic_spec(load_config(TINY, [])) is None  # recovery.mode: restart


def test_min_data_parallel_bounds_the_sizes():
    cfg = load_config(TINY, [*DP4, "recovery.min_data_parallel=2"])
    assert elastic_sizes(cfg)[0] == [4, 2]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["recovery.min_data_parallel=3"], "recovery.min_data_parallel=3 is above parallel.data=2"),
        # EP2 needs two ranks per pipeline stage: one replica is not a valid layout.
        (["recovery.mode=elastic"], "recovery.mode=elastic: no data-parallel size"),
        (["recovery.mode=elastic", "parallel.expert=1", "recovery.min_data_parallel=2"], "never"),
        (["recovery.wait_for_capacity_s=-1"], "recovery.wait_for_capacity_s"),
    ],
)
def test_impossible_settings_are_refused_naming_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TINY, overrides)


class OneRankNodes:
    """A backend whose nodes hold one rank each (a fake: only the limit is asked)."""

    name = "fake"

    def check_submission(self, world_size: int) -> None:
        pass

    def ranks_per_node_at_most(self, world_size: int) -> int:
        return 1


def test_a_model_parallel_group_larger_than_a_node_is_refused():
    cfg = load_config(
        TINY, [*DP4, "parallel.tensor=2", "parallel.sequence_parallel=true", "parallel.data=2"]
    )
    with pytest.raises(ValueError, match=r"parallel.tensor x pipeline x context = 2 x 1 x 1"):
        check_backend(OneRankNodes(), cfg)
    check_backend(OneRankNodes(), load_config(TINY, DP4))  # one rank per replica fits


def test_the_attempt_runs_at_the_data_parallel_size_the_backend_gives(monkeypatch):
    cfg = load_config(TINY, DP4)
    assert attempt_config(cfg) is cfg
    monkeypatch.setenv(DATA_PARALLEL_ENV, "2")
    two = attempt_config(cfg)
    assert two.parallel.data == 2 and two.num_microbatches == 2 * cfg.num_microbatches
    assert two.train.global_batch_size == cfg.train.global_batch_size
    monkeypatch.setenv(DATA_PARALLEL_ENV, "3")
    with pytest.raises(ValueError, match=r"not a data-parallel size this run allows: \[4, 2, 1\]"):
        attempt_config(cfg)


def test_the_largest_size_that_fits_the_capacity():
    spec = ElasticSpec(ranks_per_replica=2, replica_counts=(4, 2, 1), wait_for_capacity_s=0)
    assert [spec.largest_that_fits(r) for r in (9, 8, 7, 4, 3, 2, 1)] == [4, 4, 2, 2, 1, 1, None]
    assert ElasticSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="largest first"):
        ElasticSpec(ranks_per_replica=1, replica_counts=(1, 2), wait_for_capacity_s=0)


NODES = [
    {"ip": "10.0.0.1", "resources": {"CPU": 4.0}},
    {"ip": "10.0.0.2", "resources": {"CPU": 1.0}},
]


def test_bundles_that_fit_per_strategy():
    bundle = {"CPU": 1.0}
    fits = {s: bundles_that_fit(NODES, bundle, s) for s in ("PACK", "STRICT_SPREAD", "STRICT_PACK")}
    assert fits == {"PACK": 5, "STRICT_SPREAD": 2, "STRICT_PACK": 4}


def test_a_shrunk_group_is_pinned_to_the_nodes_that_hold_it():
    bundle = {"CPU": 1.0}
    spread = pinned_bundles(NODES, bundle, "STRICT_SPREAD", 2)
    assert [sorted(b) for b in spread] == [["CPU", "node:10.0.0.1"], ["CPU", "node:10.0.0.2"]]
    packed = pinned_bundles(NODES, bundle, "STRICT_PACK", 3)
    assert all("node:10.0.0.1" in b for b in packed) and len(packed) == 3
    assert len(pinned_bundles(NODES, bundle, "PACK", 5)) == 5


def test_slurm_refuses_a_model_parallel_group_wider_than_its_ranks_per_node(monkeypatch):
    from cluster.profile import SlurmProfile
    from cluster.slurm import SlurmBackend

    backend = SlurmBackend(SlurmProfile(nodes=4))  # 4 ranks on 4 nodes: one on each
    monkeypatch.setattr(backend, "check_submission", lambda world_size: None)  # no sinfo here
    tp2 = load_config(
        TINY, [*DP4, "parallel.tensor=2", "parallel.sequence_parallel=true", "parallel.data=2"]
    )
    with pytest.raises(ValueError, match=r"larger than one node of the slurm cluster holds \(1"):
        check_backend(backend, tp2)
