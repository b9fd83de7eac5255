"""The pure parts of ``moectl doctor`` (bench/doctor_figures.py): expert names across
expert-parallel ranks, Transformer Engine's fused-norm names, copying a local-spec model's
weights into a TE-spec one, and the FLOPs and planner figures of a config."""

from __future__ import annotations

import pytest
import torch

from moe_parallel.bench.doctor_figures import (
    copy_into_te_model,
    global_expert_name,
    local_name_of,
    planner_step_seconds,
    train_flops_per_step,
)
from moe_parallel.config import load_config
from moe_parallel.plan.estimate import estimate_step_time
from moe_parallel.plan.hardware import default_profile, shipped_profile_for
from moe_parallel.plan.memory import Layout


def test_an_expert_parallel_ranks_experts_get_their_global_numbers():
    name = "decoder.layers.3.mlp.experts.local_experts.1.linear_fc2.weight"
    assert (
        global_expert_name(name, 2)
        == "decoder.layers.3.mlp.experts.local_experts.3.linear_fc2.weight"
    )
    assert global_expert_name("decoder.layers.3.mlp.router.weight", 2) == (
        "decoder.layers.3.mlp.router.weight"
    )


def test_fused_norms_map_to_the_local_specs_norms():
    layer = "decoder.layers.0."
    assert local_name_of(layer + "self_attention.linear_qkv.layer_norm_weight") == (
        layer + "input_layernorm.weight"
    )
    assert local_name_of(layer + "mlp.linear_fc1.layer_norm_weight") == (
        layer + "pre_mlp_layernorm.weight"
    )
    # A shared expert's fc1 is not the layer's MLP: no fused norm there.
    shared = layer + "mlp.shared_experts.linear_fc1.weight"
    assert local_name_of(shared) == shared


def _layer(te: bool) -> torch.nn.Module:
    """A stand-in with the two specs' names: TE's norm inside linear_qkv, local's apart."""
    layer = torch.nn.Module()
    attention = torch.nn.Module()
    attention.linear_qkv = torch.nn.Linear(4, 12, bias=False)
    if te:
        attention.linear_qkv.layer_norm_weight = torch.nn.Parameter(torch.zeros(4))
    else:
        layer.input_layernorm = torch.nn.Module()
        layer.input_layernorm.weight = torch.nn.Parameter(torch.arange(4.0))
    layer.self_attention = attention
    model = torch.nn.Module()
    model.decoder = torch.nn.Module()
    model.decoder.layers = torch.nn.ModuleList([layer])
    return model


def test_the_te_model_gets_every_local_weight_by_name():
    local, te = _layer(te=False), _layer(te=True)
    assert copy_into_te_model(local, te) == 2
    qkv = te.decoder.layers[0].self_attention.linear_qkv
    assert torch.equal(qkv.layer_norm_weight, torch.arange(4.0))
    assert torch.equal(qkv.weight, local.decoder.layers[0].self_attention.linear_qkv.weight)


def test_a_tensor_without_a_match_is_named():
    local, te = _layer(te=False), _layer(te=True)
    te.decoder.layers[0].extra = torch.nn.Linear(2, 2, bias=False)
    with pytest.raises(ValueError, match=r"1 TE tensors without a local match.*extra.weight"):
        copy_into_te_model(local, te)


def test_flops_and_the_planners_step_time_of_the_tiny_config():
    cfg = load_config("configs/tiny/moe_tiny.yaml", ["model.vocab_size=2048"])
    # Per layer: attention 64 x (64 + 2 x 2 x 16) + 64 x 64, two RMSNorms of 64, the router
    # 64 x 4 and two SwiGLU experts 2 x (64 x 256 + 128 x 64); the output layer 2048 x 64.
    matmul_active = 4 * (12288 + 128 + 256 + 49152) + 131072
    # 6 per matmul parameter + attention scores 12 x layers x seq x width, per token; 8 x 128.
    per_token = 6 * matmul_active + 12 * 4 * 128 * 64
    count = train_flops_per_step(cfg, 2048)
    assert count == per_token * 8 * 128
    h100 = default_profile()
    predicted = planner_step_seconds(cfg, 2048, h100)
    assert predicted == estimate_step_time(cfg, Layout.of(cfg), 2048, h100).total_s
    assert predicted >= count / (cfg.world_size * h100.peak_flops)  # never above the peak
    # The doctor's profile is the shipped one of the GPU it runs on; none for other devices.
    assert shipped_profile_for("NVIDIA H100 80GB HBM3").name == h100.name
    assert "H200" in shipped_profile_for("NVIDIA H200").name
    assert shipped_profile_for("cpu") is None and shipped_profile_for("NVIDIA A100") is None
