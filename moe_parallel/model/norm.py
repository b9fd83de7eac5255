"""Norms for the local (non-Transformer-Engine) spec that also work under sequence parallelism.

Megatron's ``WrappedTorchNorm`` refuses ``sequence_parallel=True``. Under sequence parallelism
each tensor-parallel rank normalises a different slice of the sequence, so the norm's weight
gets a different gradient on each rank; Megatron all-reduces the gradients of parameters marked
``sequence_parallel = True`` over the tensor-parallel group (finalize_model_grads). Marking the
weights is therefore all a norm needs to be correct under SP.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_config import TransformerConfig


class SequenceParallelNorm:
    """A factory with Megatron's norm signature: returns torch RMSNorm or LayerNorm."""

    def __new__(
        cls,
        config: TransformerConfig,
        hidden_size: int,
        eps: float = 1e-5,
        persist_layer_norm: bool = False,
        zero_centered_gamma: bool = False,
        normalization: str | None = None,
    ) -> torch.nn.Module:
        if zero_centered_gamma:
            raise ValueError("zero-centred gamma is not supported by the local norm")
        kind = normalization or config.normalization
        if kind == "RMSNorm":
            norm: torch.nn.Module = torch.nn.RMSNorm(
                hidden_size, eps=eps, dtype=config.params_dtype
            )
        elif kind == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        else:
            raise ValueError(f"normalization={kind!r}: allowed values are 'RMSNorm', 'LayerNorm'")
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm


class ProjectionRMSNorm(torch.nn.Module):
    """RMSNorm over a whole query or key projection, all its heads together (OLMoE's q_norm and
    k_norm; ``model.qk_norm_scope: projection``), where Megatron's QK-norm normalises each head.

    Megatron calls it on the heads of this tensor-parallel rank, ``[s, b, heads / TP, head
    size]``. The mean square runs over every head, so the ranks' sums of squares are added
    (an all-reduce whose backward adds the gradients too), and each rank holds the slice of the
    weight for its heads (tensor-parallel along dimension 0, saved as such in checkpoints)."""

    heads_field = "num_attention_heads"

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_):
        super().__init__()
        heads = getattr(config, self.heads_field) or config.num_attention_heads
        tp = config.tensor_model_parallel_size
        self.width = heads * hidden_size
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(self.width // tp, dtype=config.params_dtype))
        from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

        set_tensor_model_parallel_attributes(self.weight, True, 0, 1)

    def forward(self, x_SBNH: torch.Tensor) -> torch.Tensor:
        from megatron.core import parallel_state

        s, b, n, h = x_SBNH.shape
        x = x_SBNH.reshape(s, b, n * h).float()
        squares = x.pow(2).sum(-1, keepdim=True)
        group = parallel_state.get_tensor_model_parallel_group()
        if torch.distributed.get_world_size(group) > 1:
            from torch.distributed.nn.functional import all_reduce

            squares = all_reduce(squares, group=group)
        x = x * torch.rsqrt(squares / self.width + self.eps)
        return (self.weight * x.to(x_SBNH.dtype)).reshape(s, b, n, h)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        state = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(state, prefix, {"weight": 0}, sharded_offsets)


class KeyProjectionRMSNorm(ProjectionRMSNorm):
    """The key projection's: its width is the key-value heads' (num_query_groups)."""

    heads_field = "num_query_groups"
