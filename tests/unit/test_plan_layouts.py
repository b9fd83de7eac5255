"""The layout search (valid layouts, rejection reasons) and the memory check before a launch."""

from __future__ import annotations

import pytest

from moe_parallel.config import load_config
from moe_parallel.plan.layouts import DoesNotFit, check_fits, search_layouts, target_memory_gib
from moe_parallel.plan.memory import GiB, Layout, Tensor, ddp_buffer, estimate_memory, shard_numel
from tests.conftest import REPO

MIXTRAL = REPO / "configs" / "models" / "mixtral_8x7b.yaml"
TINY = REPO / "configs" / "tiny" / "moe_tiny.yaml"


@pytest.fixture(scope="module")
def mixtral_search():
    return search_layouts(load_config(MIXTRAL), gpus=64, gpu_memory_gib=80)


def test_every_fitting_layout_is_valid_and_fits(mixtral_search):
    cfg = load_config(MIXTRAL)
    assert len(mixtral_search.fitting) > 10
    times = [c.time.total_s for c in mixtral_search.fitting]
    assert times == sorted(times)
    for c in mixtral_search.fitting:
        L = c.layout
        assert L.world_size == 64 and 8 % L.expert == 0 and 32 % L.pipeline == 0
        assert L.sequence_parallel == (L.tensor > 1)
        assert cfg.train.global_batch_size % (L.micro_batch_size * L.data) == 0
        assert c.memory.peak_bytes <= 80 * GiB
        assert c.time.compute_s > 0 and c.time.total_s >= c.time.compute_s


def test_rejections_name_the_rule(mixtral_search):
    reasons = mixtral_search.rejected
    # 46.7B parameters do not fit one GPU's 80 GiB without model parallelism
    memory = [r for r in reasons if r.startswith("memory:")]
    assert memory and "TP1 PP1 EP1 DP64" in mixtral_search.examples[memory[0]]
    assert any("not divisible by parallel.pipeline" in r for r in reasons)  # 32 layers, PP64
    assert any("does not divide the N ranks of a pipeline stage" in r for r in reasons)
    fitting = {
        (c.layout.tensor, c.layout.pipeline, c.layout.expert) for c in mixtral_search.fitting
    }
    assert (1, 1, 1) not in fitting


def test_heads_and_batch_rules_reject_with_the_config_message():
    cfg = load_config(TINY, ["model.vocab_size=512"])
    result = search_layouts(cfg, gpus=8, gpu_memory_gib=80)
    text = " | ".join(result.rejected)
    assert (
        "model.num_attention_heads=N is not divisible by parallel.tensor=N" in text
    )  # 4 heads, TP8
    assert (
        "train.global_batch_size=N is not divisible by train.micro_batch_size x parallel.data"
        in text
    )
    assert result.fitting  # e.g. TP1 PP1 EP4 DP8 mbs 1


def test_more_memory_fits_more_layouts():
    cfg = load_config(MIXTRAL)
    small = search_layouts(cfg, gpus=64, gpu_memory_gib=40)
    large = search_layouts(cfg, gpus=64, gpu_memory_gib=141)
    assert 0 < len(small.fitting) < len(large.fitting)


def test_recompute_and_sharding_reduce_memory():
    cfg = load_config(MIXTRAL)
    base = Layout.of(cfg)
    none = estimate_memory(cfg, base).worst
    full = estimate_memory(cfg, Layout.of(cfg, recompute="full")).worst
    assert full.activations < none.activations / 4
    plain = Layout(**{**base.__dict__, "distributed_optimizer": False})
    assert estimate_memory(cfg, plain).worst.optimizer > none.optimizer


def test_distributed_optimizer_buffer_padding():
    params = [Tensor("a", 100), Tensor("b", 30), Tensor("c", 1)]
    buf = ddp_buffer(params, group=2, distributed=True)
    # reversed order: c at 0, b at 64, a at 128 (starts aligned to 64), end padded to lcm(2,128)
    assert buf.ranges == [(0, 1), (64, 94), (128, 228)] and buf.numel == 256
    assert shard_numel(buf, 2, 0) + shard_numel(buf, 2, 1) == 131
    assert shard_numel(buf, 2, 0) == 1 + 30 + 0 and shard_numel(buf, 2, 1) == 100
    assert ddp_buffer(params, group=2, distributed=False).numel == 131


def test_a_layout_that_cannot_fit_is_refused_and_force_lets_it_through():
    cfg = load_config(
        MIXTRAL,
        [
            "parallel.tensor=1",
            "parallel.pipeline=1",
            "parallel.expert=1",
            "parallel.data=64",
            "parallel.sequence_parallel=false",
        ],
    )
    with pytest.raises(
        DoesNotFit,
        match=r"needs about \d+\.\d GiB on pipeline stage 0 .* but "
        r"the GPUs have 80 GiB.*--force",
    ):
        check_fits(cfg, 80)
    assert check_fits(cfg, 80, force=True) is None
    assert check_fits(cfg, None) is None  # no target: CPU ranks are not checked
    assert check_fits(load_config(MIXTRAL), 80).peak_bytes < 80 * GiB  # its own layout fits


def test_target_memory_rule():
    assert target_memory_gib(40.0, ranks_have_gpus=False) == 40.0  # an explicit flag always
    assert target_memory_gib(None, ranks_have_gpus=False) is None  # CPU ranks: no check
    assert target_memory_gib(None, ranks_have_gpus=True, device_memory_gib=139.8) == 139.8
    assert target_memory_gib(None, ranks_have_gpus=True) == 80.0  # submit to GPU nodes


def test_submit_refuses_before_anything_is_submitted(tmp_path, capsys, monkeypatch):
    import moe_parallel.launch_run as launch_run
    from launch.cli import main

    def never(*a, **k):
        raise AssertionError("submit_run must not be called")

    monkeypatch.setattr(launch_run, "submit_run", never)
    profile = tmp_path / "gpus.yaml"
    profile.write_text("backend: slurm\nslurm:\n  gpus_per_node: 8\n  nodes: 8\n")
    code = main(
        [
            "submit",
            str(MIXTRAL),
            "--cluster",
            str(profile),
            "--runs",
            str(tmp_path / "runs"),
            "parallel.tensor=1",
            "parallel.pipeline=1",
            "parallel.expert=1",
            "parallel.data=64",
            "parallel.sequence_parallel=false",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "moectl: error: the layout TP1 PP1 EP1 DP64" in err and "80 GiB" in err
    assert not (tmp_path / "runs").exists()


def test_train_check_does_not_block_cpu_ranks_unless_asked():
    from moe_parallel.plan.layouts import local_memory_check

    huge = load_config(
        MIXTRAL,
        [
            "parallel.tensor=1",
            "parallel.pipeline=1",
            "parallel.expert=1",
            "parallel.data=64",
            "parallel.sequence_parallel=false",
            "train.device=cpu",
            "train.fp8=null",
        ],
    )
    local_memory_check(None, force=False)(huge)  # CPU ranks: no GPU memory to check against
    with pytest.raises(DoesNotFit):
        local_memory_check(80.0, force=False)(huge)  # an explicit --gpu-memory is checked
    local_memory_check(80.0, force=True)(huge)
