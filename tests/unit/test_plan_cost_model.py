"""The per-op step-time model's pieces: rate tables, collectives, fits, bubbles, overlap, the
stage split, and the ranking it gives Mixtral 8x7B on 64 GPUs."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from moe_parallel.config import load_config
from moe_parallel.plan.costs import (
    Gemm,
    collective_time,
    fit_link,
    gemm_time,
    pipeline_bubble,
)
from moe_parallel.plan.estimate import Overlap, estimate_step_time
from moe_parallel.plan.hardware import COLLECTIVES, Link, default_profile, interpolate_rate
from moe_parallel.plan.layouts import search_layouts
from moe_parallel.plan.memory import Layout, chunk_layers
from tests.conftest import REPO

MIXTRAL = REPO / "configs" / "models" / "mixtral_8x7b.yaml"
TABLE = ((1e6, 1e9), (1e8, 3e9), (1e10, 5e9))


def test_rate_table_interpolates_in_log_flops_and_clamps():
    assert interpolate_rate(TABLE, 1e6) == 1e9
    assert interpolate_rate(TABLE, 1e7) == pytest.approx(2e9)  # halfway in log(FLOPs)
    assert interpolate_rate(TABLE, 1e9) == pytest.approx(4e9)
    assert interpolate_rate(TABLE, 1e3) == 1e9 and interpolate_rate(TABLE, 1e12) == 5e9


def test_small_gemms_run_at_a_lower_rate():
    hw = replace(default_profile(), gemm=TABLE, memory_bandwidth=1e15)
    whole, half = Gemm(1000, 1000, 1000), Gemm(1000, 1000, 500)  # TP2 halves N
    rate = 3e9 + 2e9 * math.log10(2e9 / 1e8) / 2  # 2e9 FLOPs, between the table's points
    assert gemm_time(whole, hw, 2) == pytest.approx(2e9 / rate)
    # half the FLOPs (1e9) at 4e9 FLOP/s: more than half the time
    assert gemm_time(half, hw, 2) == pytest.approx(1e9 / 4e9)
    assert gemm_time(half, hw, 2) > 0.53 * gemm_time(whole, hw, 2)


def test_collectives_follow_the_bus_bandwidth_convention():
    link = Link(latency_s=1e-5, bus_bandwidth=1e9)
    size = 8e6
    assert collective_time("all_gather", size, 8, link) == pytest.approx(7e-5 + size * 7 / 8 / 1e9)
    assert collective_time("all_reduce", size, 8, link) == pytest.approx(
        14e-5 + 2 * size * 7 / 8 / 1e9
    )
    assert collective_time("p2p", size, 2, link) == pytest.approx(1e-5 + size / 1e9)
    assert collective_time("all_to_all", size, 1, link) == 0.0


def test_fit_link_recovers_latency_and_bandwidth():
    truth = Link(latency_s=2e-4, bus_bandwidth=5e8)
    sizes = [2.0**k for k in range(12, 25, 2)]
    times = [collective_time("reduce_scatter", s, 2, truth) for s in sizes]
    fitted = fit_link("reduce_scatter", 2, sizes, times)
    assert fitted.latency_s == pytest.approx(2e-4, rel=1e-6)
    assert fitted.bus_bandwidth == pytest.approx(5e8, rel=1e-6)


def test_pipeline_bubble_of_1f1b_and_interleaving():
    assert pipeline_bubble(0.1, 4, 1) == pytest.approx(0.3)
    assert pipeline_bubble(0.1, 4, 2) == pytest.approx(0.15)


def test_stage_split_one_path_for_even_uneven_and_interleaved():
    m = load_config(MIXTRAL).model  # 32 layers
    assert chunk_layers(m, Layout(pipeline=4), 1) == [list(range(8, 16))]
    assert chunk_layers(m, Layout(pipeline=4, virtual_pipeline=2), 1) == [
        list(range(4, 8)),
        list(range(20, 24)),
    ]
    uneven = Layout(pipeline=4, first_stage_layers=5, last_stage_layers=3)
    assert [len(chunk_layers(m, uneven, r)[0]) for r in range(4)] == [5, 12, 12, 3]
    assert chunk_layers(m, uneven, 3) == [list(range(29, 32))]


@pytest.fixture(scope="module")
def mixtral():
    cfg = load_config(MIXTRAL)
    return cfg, Layout.of(cfg)


def test_interleaving_shrinks_the_bubble(mixtral):
    cfg, _ = mixtral
    hw = default_profile()
    plain = Layout(tensor=2, pipeline=4, expert=8, data=8, sequence_parallel=True)
    vpp = replace(plain, virtual_pipeline=2)
    a = estimate_step_time(cfg, plain, 32768, hw)
    b = estimate_step_time(cfg, vpp, 32768, hw)
    assert b.bubble_s == pytest.approx(a.bubble_s / 2, rel=0.01)
    assert b.pp_comm_s == pytest.approx(2 * a.pp_comm_s)


def test_overlap_hides_dp_and_expert_communication(mixtral):
    cfg, _ = mixtral
    hw = default_profile()
    layout = Layout(tensor=1, pipeline=1, expert=8, data=64)
    off = estimate_step_time(cfg, layout, 32768, hw)
    on = estimate_step_time(cfg, layout, 32768, hw, Overlap(True, True, True))
    assert off.dp_comm_s > 0 and on.dp_comm_s < off.dp_comm_s
    assert on.ep_comm_s < off.ep_comm_s
    assert on.compute_s == off.compute_s


def test_across_nodes_costs_more_than_inside_one(mixtral):
    cfg, _ = mixtral
    hw = default_profile()
    inside = estimate_step_time(cfg, Layout(pipeline=8, expert=8, data=8), 32768, hw)
    across = estimate_step_time(
        cfg, Layout(pipeline=8, expert=8, data=8, tensor=1), 32768, replace(hw, gpus_per_node=4)
    )
    assert across.ep_comm_s > 5 * inside.ep_comm_s


def test_mixtral_64_gpus_ranks_expert_parallel_first():
    """The fixed-MFU model ranked TP2 PP8 EP1 first (issue #22); per op, with the a2a inside a
    node, expert parallelism wins: small dense TP GEMMs and the deep pipeline's bubble cost."""
    result = search_layouts(load_config(MIXTRAL), gpus=64, gpu_memory_gib=80)
    best = result.fitting[0].layout
    assert best.expert == 8 and best.pipeline <= 2
    old_best = next(
        c
        for c in result.fitting
        if (c.layout.tensor, c.layout.pipeline, c.layout.expert) == (2, 8, 1)
    )
    assert old_best.time.total_s > 1.05 * result.fitting[0].time.total_s
    assert 0.2 < 6 * 12.9e9 * 1024 * 4096 / (result.fitting[0].time.total_s * 64 * 989e12) < 0.7


def test_a_sequence_parallel_region_makes_megatrons_five_collective_calls():
    """Column then row linear under SP: forward all-gather + reduce-scatter; backward the row
    output's gradient gathered, the column input gathered again, its gradient scattered."""
    from moe_parallel.plan.estimate import Shapes, tp_exchange

    link = Link(latency_s=1e-3, bus_bandwidth=1e9)
    hw = replace(default_profile(), intra_node=dict.fromkeys(COLLECTIVES, link))
    sh = Shapes(tokens=1024, seq=1024, batch=1, tp=2, sp_tokens=512, value_bytes=2)
    size = 1024 * 64 * 2
    one = collective_time("all_gather", size, 2, link)
    sp = tp_exchange(sh, 64, Layout(tensor=2, sequence_parallel=True), hw)
    assert sp.calls == 5 and sp.tp == pytest.approx(5 * one)
    column = tp_exchange(sh, 64, Layout(tensor=2, sequence_parallel=True), hw, row=False)
    assert column.calls == 3 and column.tp == pytest.approx(3 * one)
    plain = tp_exchange(sh, 64, Layout(tensor=2), hw)
    assert plain.calls == 2
    assert plain.tp == pytest.approx(2 * collective_time("all_reduce", size, 2, link))


def tiny_step(overrides: list[str], hw):
    cfg = load_config(REPO / "configs" / "tiny" / "moe_tiny.yaml", overrides)
    layout = Layout.of(cfg)
    return estimate_step_time(cfg, layout, 2048, hw)


TP2_SP = [
    "parallel.expert=1",
    "parallel.data=1",
    "parallel.tensor=2",
    "parallel.sequence_parallel=true",
]


def test_each_collective_call_adds_the_profiles_host_time():
    """moe_tiny under TP2+SP (EP1, ETP2): per micro-batch 4 layers x (attention's region 5 +
    the dispatcher's count gather 1 + token gather and scatter, forward and backward, 4) + the
    output layer's 3 = 43 calls; 4 micro-batches."""
    hw = default_profile()
    base = tiny_step(TP2_SP, replace(hw, collective_host_s=0.0, host_overlaps_device=False))
    more = tiny_step(TP2_SP, replace(hw, collective_host_s=1e-3, host_overlaps_device=False))
    assert more.compute_s - base.compute_s == pytest.approx(4 * 43 * 1e-3)
    one_rank = ["parallel.expert=1", "parallel.data=1"]
    a = tiny_step(one_rank, replace(hw, collective_host_s=0.0))
    assert tiny_step(one_rank, replace(hw, collective_host_s=1.0)).total_s == a.total_s


def test_gradient_accumulation_and_buffer_zeroing_move_the_weights_gradients():
    """Without gradient_accumulation_fusion every micro-batch adds each weight's gradient into
    its fp32 main_grad (read value-size + 4, write 4 bytes per element), and the step zeroes the
    buffer (4 bytes): on a bandwidth of 1 byte/s freezing the experts saves exactly those bytes."""
    from moe_parallel.model.param_names import Trainable
    from moe_parallel.plan.estimate import trainable_numel

    cfg = load_config(
        REPO / "configs" / "tiny" / "moe_tiny.yaml", ["parallel.expert=1", "parallel.data=1"]
    )
    hw = replace(
        default_profile(), op_latency_s=0.0, host_overlaps_device=False, memory_bandwidth=1.0
    )
    layout = Layout.of(cfg)
    frozen = replace(layout, trainable=Trainable(freeze=("experts",)))
    _, experts = trainable_numel(cfg.model, layout, 2048)
    assert experts > 0 and trainable_numel(cfg.model, frozen, 2048)[1] == 0
    step = estimate_step_time(cfg, layout, 2048, hw)
    less = estimate_step_time(cfg, frozen, 2048, hw)
    micro = cfg.num_microbatches
    assert step.compute_s - less.compute_s == pytest.approx(micro * experts * (4 + 8))
    # Adam's 32 bytes per element of the shard (fp32, one rank) and the zeroing's 4
    assert step.optimizer_s - less.optimizer_s == pytest.approx(experts * (32 + 4))


def test_the_step_bandwidth_fit_recovers_the_bandwidth_of_a_predicted_step():
    from moe_parallel.bench.calibrate import MID_CONFIG, predicted, step_memory_bandwidth

    hw = replace(default_profile(), host_overlaps_device=False, layer_host_s=1e-3)
    truth = replace(hw, memory_bandwidth=3.0e9)
    step = predicted(MID_CONFIG, [], truth)
    assert step > predicted(MID_CONFIG, [], hw)  # the bandwidth matters to this model's step
    assert step_memory_bandwidth(hw, step) == pytest.approx(3.0e9, rel=1e-6)
