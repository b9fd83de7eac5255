"""The figures and name mappings of ``moectl doctor``, apart from the runs that produce them
(``doctor_rank.py``): FLOPs per step and the planner's step time for a config, a matmul's
FLOP rate, the global name of an expert-parallel rank's expert tensor, and the local spec's
tensor for each tensor of Transformer Engine's spec."""

from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING

import torch

from moe_parallel.plan.estimate import estimate_step_time
from moe_parallel.plan.hardware import HardwareProfile
from moe_parallel.plan.memory import Layout
from moe_parallel.plan.params import attention_width, count_parameters

if TYPE_CHECKING:
    from moe_parallel.config import RunConfig

# Transformer Engine's layer spec fuses a norm into the linear after it (Megatron-core 0.16.1,
# get_gpt_layer_with_transformer_engine_spec: TELayerNormColumnParallelLinear for linear_qkv and,
# in dense layers, for mlp.linear_fc1); the local spec keeps the norm as its own module.
TE_FUSED_NORMS = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_bias": "input_layernorm.bias",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
    "mlp.linear_fc1.layer_norm_bias": "pre_mlp_layernorm.bias",
}


def planner_step_seconds(cfg: RunConfig, padded_vocab: int, profile: HardwareProfile) -> float:
    """The planner's predicted step time of ``cfg``'s own layout on ``profile`` (the only call
    into the planner's step-time model)."""
    return estimate_step_time(cfg, Layout.of(cfg), padded_vocab, profile).total_s


def train_flops_per_step(cfg: RunConfig, padded_vocab: int) -> float:
    """Training FLOPs of one step by the planner's count (plan/params.py): per token 6 per active
    matmul parameter plus the attention scores, times the global batch's tokens."""
    m = cfg.model
    per_token = count_parameters(m, padded_vocab).flops_per_token(
        m.seq_length, m.num_layers, attention_width(m)
    )
    return per_token * cfg.train.global_batch_size * m.seq_length


def matmul_flops_per_s(device: torch.device, precision: str, repeats: int = 5) -> float:
    """The best FLOP rate of a square matmul in the run's dtype on ``device`` (the peak MFU is
    taken against where no datasheet figure exists, e.g. CPU ranks)."""
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    n = 4096 if device.type == "cuda" else 512
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    best = float("inf")
    for _ in range(repeats):
        _synchronize(device)
        started = time.perf_counter()
        a @ b
        _synchronize(device)
        best = min(best, time.perf_counter() - started)
    return 2 * n**3 / best


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def global_expert_name(name: str, first_expert: int) -> str:
    """``...experts.local_experts.<i>...`` of a rank whose first expert is ``first_expert`` as
    the one-rank model names it (``<first_expert + i>``); other names unchanged."""
    return re.sub(
        r"\.local_experts\.(\d+)\.",
        lambda m: f".local_experts.{first_expert + int(m.group(1))}.",
        name,
    )


def local_name_of(te_name: str) -> str:
    """The local spec's name of a tensor of Transformer Engine's spec."""
    for fused, local in TE_FUSED_NORMS.items():
        if te_name.endswith("." + fused):
            return te_name[: -len(fused)] + local
    return te_name


def copy_into_te_model(local: torch.nn.Module, te: torch.nn.Module) -> int:
    """Copy every parameter of the local-spec model into the TE-spec one (names mapped by
    :func:`local_name_of`); every non-empty tensor on both sides must find its match, of the
    same shape.
    Returns the number copied."""
    source = dict(local.named_parameters())
    unmatched, used = [], set()
    for name, param in te.named_parameters():
        if param.numel() == 0:  # a placeholder (e.g. an unused bias), nothing to copy
            continue
        src = source.get(local_name_of(name))
        if src is None or src.shape != param.shape:
            unmatched.append(name)
            continue
        with torch.no_grad():
            param.copy_(src)
        used.add(local_name_of(name))
    left = sorted(set(source) - used)
    if unmatched or left:
        raise ValueError(
            f"Transformer Engine spec vs local spec: {len(unmatched)} TE tensors without a local "
            f"match of the same shape (e.g. {unmatched[:3]}), {len(left)} local tensors unused "
            f"(e.g. {left[:3]})"
        )
    return len(used)


def relative_difference(output: torch.Tensor, reference: torch.Tensor) -> float:
    """||output - reference|| / ||reference||."""
    return float((output - reference).norm() / reference.norm())
