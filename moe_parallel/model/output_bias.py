"""A bias on the output (LM head) layer: GRIN / PhiMoE has one (``lm_head_bias``).

Megatron's GPTModel builds its output layer without a bias. The layer is a ColumnParallelLinear,
which adds ``self.bias`` when it has one and shards it with the vocabulary (axis 0) in its
checkpoint, so giving it a bias parameter, zero-initialised and marked tensor-parallel like the
ones ColumnParallelLinear creates itself, is all that is needed.
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes


def add_output_layer_bias(model) -> None:
    layer = getattr(model, "output_layer", None)
    if layer is None:  # not the last pipeline stage
        return
    if layer.bias is not None:
        raise ValueError("the output layer already has a bias")
    bias = torch.nn.Parameter(
        torch.zeros(
            layer.output_size_per_partition,
            dtype=layer.config.params_dtype,
            device=next(model.parameters()).device,
        )
    )
    set_tensor_model_parallel_attributes(bias, True, 0, 1)
    bias.allreduce = True
    layer.bias = bias
