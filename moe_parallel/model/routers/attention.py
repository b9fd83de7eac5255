"""Yuan 2.0-M32's attention router (Wu et al., arXiv 2405.17976, section 3).

A plain router scores each expert independently: logits = W x. The attention router lets the
experts' scores depend on each other: three bias-free projections give per-token vectors
Q, K, V in R^E; the E x E matrix softmax(Q K^T) (an outer product over experts, no 1/sqrt(E)
scaling, softmax along the last axis) mixes V into the E logits:

    logits = softmax(Q K^T) V          (per token; Q, K, V of shape [E, 1])

The logits then go through Megatron's top-k routing unchanged (Yuan: softmax over the top-2
logits, i.e. renormalised top-2 weights = ``pre_softmax: false``). The projections are one
[3E, d] weight, Q rows first, then K, then V, as in Yuan's released ``query_key_value`` layer;
the router runs in fp32 (Yuan's pretraining script: --use-fp32-router).

Shapes: S sequence, B batch, E experts, d hidden.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.moe_utils import router_gating_linear
from megatron.core.transformer.moe.router import TopKRouter


def expert_attention(qkv_SB3E: torch.Tensor) -> torch.Tensor:
    """[..., 3E] projections -> [..., E] logits."""
    q, k, v = (t.unsqueeze(-1) for t in qkv_SB3E.chunk(3, dim=-1))  # [..., E, 1]
    weights_EE = torch.softmax(q @ k.transpose(-1, -2), dim=-1)  # [..., E, E]
    return (weights_EE @ v).squeeze(-1)


class AttentionRouter(TopKRouter):
    def __init__(self, config, pg_collection=None) -> None:
        super().__init__(config=config, pg_collection=pg_collection)
        if self.bias is not None:
            raise ValueError("the attention router has no bias: set model.add_bias_linear=false")
        E, d = config.num_moe_experts, config.hidden_size
        self.weight = torch.nn.Parameter(torch.empty((3 * E, d), dtype=torch.float32))
        self.reset_parameters()

    def gating(self, input: torch.Tensor) -> torch.Tensor:
        dtype = {"fp32": torch.float32, "fp64": torch.float64}.get(
            self.config.moe_router_dtype, input.dtype
        )
        return expert_attention(router_gating_linear(input, self.weight, None, dtype))
