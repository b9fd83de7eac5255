"""Layout-invariant weight initialisation.

Megatron initialises each rank's shard from that rank's RNG stream, so the same seed gives a
different model under EP=2 than under EP=1, and a different one again under PP=2. Here every
tensor is drawn from a generator seeded by the tensor's *global* checkpoint key (and its layer /
expert index), in its full global shape, and each rank keeps its own slice. The result is the
same model for every layout, which is what lets tests compare layouts loss for loss and lets a
user change layout without changing the experiment.

The distributions are Megatron's: N(0, init_method_std) for every matrix, with the output
projections of attention and MLP (linear_proj, linear_fc2) scaled by 1/sqrt(2 * num_layers)
(Megatron's ``scaled_init_method_normal``, after GPT-2); norms stay at one and biases at zero.
"""

from __future__ import annotations

import hashlib
import math

import torch
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.transformer.transformer_config import TransformerConfig

from . import megatron_fixes

_SCALED_OUTPUTS = ("linear_proj.weight", "linear_fc2.weight", "expert_up.weight")
# PEER's expert tables (N x d, N up to 2^20): drawn in blocks of rows, each block from its own
# generator, so that a rank draws only the blocks that overlap its rows (model/layers/peer.py).
_ROW_BLOCKED = ("mlp.expert_down.weight", "mlp.expert_up.weight")
_BLOCK_ROWS = 4096


@torch.no_grad()
def init_layout_invariant(model: torch.nn.Module, seed: int, config: TransformerConfig) -> None:
    for sh in _sharded_tensors(megatron_fixes.sharded_state_dict(model)):
        std = _std_for(sh.key, config)
        if std is None:
            continue
        prepend = sh.prepend_axis_num
        if sh.key.endswith(_ROW_BLOCKED) and prepend == 0:
            _init_row_blocks(sh, seed, std)
            continue
        index = tuple(sh.global_offset[:prepend])  # layer / expert position in the stack
        full_shape = tuple(sh.global_shape[prepend:])
        generator = torch.Generator(device=sh.data.device)
        generator.manual_seed(_seed_for(seed, sh.key, index))
        full = torch.empty(full_shape, dtype=torch.float32, device=sh.data.device)
        full.normal_(0.0, std, generator=generator)
        region = tuple(
            slice(start, start + size)
            for start, size in zip(sh.global_offset[prepend:], sh.data.shape)
        )
        sh.data.copy_(full[region])


def _init_row_blocks(sh: ShardedTensor, seed: int, std: float) -> None:
    start, rows = sh.global_offset[0], sh.data.shape[0]
    first, last = start // _BLOCK_ROWS, (start + rows - 1) // _BLOCK_ROWS
    for block in range(first, last + 1):
        block_start = block * _BLOCK_ROWS
        size = min(_BLOCK_ROWS, sh.global_shape[0] - block_start)
        generator = torch.Generator(device=sh.data.device)
        generator.manual_seed(_seed_for(seed, sh.key, (block,)))
        full = torch.empty((size, *sh.global_shape[1:]), dtype=torch.float32, device=sh.data.device)
        full.normal_(0.0, std, generator=generator)
        lo, hi = max(start, block_start), min(start + rows, block_start + size)
        sh.data[lo - start : hi - start].copy_(full[lo - block_start : hi - block_start])


def _std_for(key: str, config: TransformerConfig) -> float | None:
    last = key.rsplit(".", 1)[-1]
    if "norm" in last or "norm" in key.rsplit(".", 2)[-2] or last.endswith("bias"):
        return None  # norms keep 1, biases 0: already deterministic
    if "_extra_state" in key or not last.endswith("weight"):
        return None
    if key.endswith(_SCALED_OUTPUTS):
        return config.init_method_std / math.sqrt(2.0 * config.num_layers)
    return config.init_method_std


def _seed_for(seed: int, key: str, index: tuple[int, ...]) -> int:
    text = f"{seed}|{key}|{','.join(map(str, index))}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & ((1 << 63) - 1)


def _sharded_tensors(state: dict):
    """Flatten a sharded state dict into ShardedTensors whose .data alias the parameters."""
    for value in state.values():
        if isinstance(value, dict):
            yield from _sharded_tensors(value)
        elif isinstance(value, ShardedTensor):
            yield value
        elif isinstance(value, ShardedTensorFactory):
            built = value.build()
            yield from _sharded_tensors(built if isinstance(built, dict) else _as_dict(built))
        elif isinstance(value, (list, tuple)):
            yield from _sharded_tensors(_as_dict(value))


def _as_dict(items) -> dict:
    return dict(enumerate(items)) if isinstance(items, (list, tuple)) else {"_": items}
