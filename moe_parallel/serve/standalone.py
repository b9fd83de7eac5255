"""One Megatron MoE layer (router + SequentialMLP experts) in this process, for the buffering and
placement checks and benchmarks: 1-rank process groups, the CPU adapter when there is no GPU."""

from __future__ import annotations

import os
import tempfile

import torch


def start_one_rank(seed: int = 0, expert_parallel: int = 1) -> str:
    """Join a gloo/NCCL group (the launcher's env:// when RANK is set, else a 1-rank group) and
    Megatron's groups (``expert_parallel`` EP ranks); returns the device ("cpu"/"cuda")."""
    from megatron.core import parallel_state, tensor_parallel

    from moe_parallel.runtime import cpu_adapter as device_adapter

    device = "cpu" if device_adapter.activate_if_needed() else "cuda"
    if not torch.distributed.is_initialized() and "RANK" in os.environ:
        torch.distributed.init_process_group(
            "gloo" if device == "cpu" else "nccl", init_method="env://"
        )
    if not torch.distributed.is_initialized():
        store = tempfile.mktemp(prefix="moe-serve-store-")
        torch.distributed.init_process_group(
            "gloo" if device == "cpu" else "nccl",
            init_method=f"file://{store}",
            rank=0,
            world_size=1,
        )
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(expert_model_parallel_size=expert_parallel)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return device


def build_moe_layer(
    hidden: int = 16,
    ffn: int = 32,
    experts: int = 8,
    top_k: int = 2,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    capacity_factor: float | None = None,
):
    """An eval-mode MoELayer (SwiGLU experts, no biases, alltoall dispatcher): dropless, or with
    ``capacity_factor`` static gating (fixed capacity, padded, tokens over it dropped)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import build_module
    from megatron.core.transformer.transformer_config import TransformerConfig

    torch.manual_seed(seed)
    config = TransformerConfig(
        num_layers=1,
        hidden_size=hidden,
        num_attention_heads=2,
        ffn_hidden_size=ffn,
        moe_ffn_hidden_size=ffn,
        num_moe_experts=experts,
        moe_router_topk=top_k,
        moe_token_dispatcher_type="alltoall",
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        use_cpu_initialization=True,
        add_bias_linear=False,
        moe_grouped_gemm=False,
        params_dtype=dtype,
        init_method_std=0.5,
        bf16=False,
        moe_expert_capacity_factor=capacity_factor,
        moe_pad_expert_input_to_capacity=capacity_factor is not None,
    )
    spec = get_gpt_layer_local_spec(num_experts=experts, moe_grouped_gemm=False).submodules.mlp
    layer = build_module(spec, config=config)
    return layer.eval()
