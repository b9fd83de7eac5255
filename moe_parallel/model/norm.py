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
