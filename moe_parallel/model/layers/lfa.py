"""Yuan 2.0's Localized Filtering-based Attention (LFA; arXiv 2311.15786 section 3.1, used in
Yuan 2.0-M32, arXiv 2405.17976).

Plain attention treats the input tokens as a set. LFA first filters the attention's input
along the sequence with two causal convolutions, so that queries and keys carry local context
(each token mixes with the two before it), then adds the input back and normalises:

    y1[t] = A0 x[t-1] + A1 x[t] + a            (d -> d/2)
    y2[t] = B0 y1[t-1] + B1 y1[t] + b          (d/2 -> d)
    lf(x) = RMSNorm(y2 + x)

Queries and keys are projected from lf(x); values from x itself. The convolutions keep Yuan's
parameter shapes (Conv2d weights [out, in, 2, 1], kernel index 0 = previous token), so released
weights map one to one.

In Megatron the filter lives inside the attention's ``linear_qkv`` slot (a spec entry, no edited
attention): ``LocalizedFilteringQKV`` is a ColumnParallelLinear that gathers the sequence itself
(sequence parallelism shards it across tensor-parallel ranks, and the causal filter needs the
previous tokens), filters, and projects q and k from the filtered input, v from the raw input.
Each tensor-parallel rank then holds a partial gradient of the filter (only its heads' columns
feed back into it); the filter's parameters are marked ``sequence_parallel`` so that Megatron
all-reduces them over the tensor-parallel group, exactly as it does for norms.

Shapes: S sequence, B batch, d hidden, G local query groups, h head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.layers import ColumnParallelLinear
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)


def _causal_pair(
    x_SBi: torch.Tensor, weight_oi21: torch.Tensor, bias_o: torch.Tensor
) -> torch.Tensor:
    """y[t] = W[:, :, 0] x[t-1] + W[:, :, 1] x[t] + b, with x[-1] = 0."""
    previous_SBi = F.pad(x_SBi, (0, 0, 0, 0, 1, 0))[:-1]
    return F.linear(previous_SBi, weight_oi21[:, :, 0, 0]) + F.linear(
        x_SBi, weight_oi21[:, :, 1, 0], bias_o
    )


class LocalizedFiltering(torch.nn.Module):
    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        half = hidden_size // 2
        self.conv1 = torch.nn.Conv2d(hidden_size, half, (2, 1), dtype=dtype)
        self.conv2 = torch.nn.Conv2d(half, hidden_size, (2, 1), dtype=dtype)
        self.output_layernorm = torch.nn.RMSNorm(hidden_size, eps=eps, dtype=dtype)
        with torch.no_grad():  # layout-invariant init (model/init.py) sets the conv weights
            self.conv1.bias.zero_()
            self.conv2.bias.zero_()

    def forward(self, x_SBd: torch.Tensor) -> torch.Tensor:
        y1 = _causal_pair(x_SBd, self.conv1.weight, self.conv1.bias)
        y2 = _causal_pair(y1, self.conv2.weight, self.conv2.bias)
        return self.output_layernorm(y2 + x_SBd)


class LocalizedFilteringQKV(ColumnParallelLinear):
    """Megatron's fused q/k/v projection with LFA in front of q and k (see the module doc)."""

    def __init__(self, input_size: int, output_size: int, *, config, **kwargs) -> None:
        super().__init__(input_size, output_size, config=config, **kwargs)
        tp = self.tp_group.size()
        if tp > 1 and not config.sequence_parallel:
            raise ValueError(
                "model.attention=lfa with parallel.tensor > 1 needs parallel.sequence_parallel=true"
            )
        self.filter = LocalizedFiltering(
            config.hidden_size, config.layernorm_epsilon, config.params_dtype
        )
        for param in self.filter.parameters():
            param.sequence_parallel = config.sequence_parallel
        heads, groups = (
            config.num_attention_heads,
            config.num_query_groups or config.num_attention_heads,
        )
        self.local_groups = groups // tp
        self.head_dim = config.kv_channels
        self.qk_rows = (heads // groups + 1) * self.head_dim  # per group: its queries, then k

    def forward(self, input_, weight=None, runtime_gather_output=None):
        if weight is not None or runtime_gather_output:
            raise ValueError("LocalizedFilteringQKV takes its own weight and never gathers output")
        x_SBd = self._full_sequence(input_)
        filtered_SBd = self.filter(x_SBd)
        w = self.weight.view(self.local_groups, -1, self.input_size)
        add_bias = self.bias is not None and not self.skip_bias_add
        b = self.bias.view(self.local_groups, -1) if add_bias else None
        qk = F.linear(
            filtered_SBd,
            w[:, : self.qk_rows].reshape(-1, self.input_size),
            None if b is None else b[:, : self.qk_rows].reshape(-1),
        )
        v = F.linear(
            x_SBd,
            w[:, self.qk_rows :].reshape(-1, self.input_size),
            None if b is None else b[:, self.qk_rows :].reshape(-1),
        )
        S, B = x_SBd.shape[:2]
        out = torch.cat(
            [qk.view(S, B, self.local_groups, -1), v.view(S, B, self.local_groups, -1)], dim=-1
        ).view(S, B, -1)
        return out, (self.bias if self.skip_bias_add else None)

    def _full_sequence(self, x: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:
            return gather_from_sequence_parallel_region(
                x, tensor_parallel_output_grad=True, group=self.tp_group
            )
        if self.tp_group.size() > 1:
            return copy_to_tensor_model_parallel_region(x, group=self.tp_group)
        return x
