"""Layout-invariant routing noise: uniforms keyed by (seed, layer, draw, sample, position, expert).

A stochastic router (SparseMixer-v2 samples its experts) that drew from a rank's RNG stream
would route the same token differently under EP=1 and EP=2, under DP=1 and DP=2, or after a
resume: layouts could not be compared loss for loss, and a resumed run would not be the run it
continues. Here each draw is a hash of the token's identity instead: its global sample index in
the dataset (train/batches.py), its position in the sequence, the expert, the router's layer,
the draw's number and the run's seed. Every layout and every resume sees the same numbers, and
no generator state needs checkpointing.

The training step names the samples of the micro-batch it is about to run (``set_samples``)
immediately before the forward; a training-mode router that finds no samples named raises.

Shapes: S local sequence length (the sequence-parallel slice), B micro-batch, E experts.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

_MASK32 = 0xFFFFFFFF
_state: dict[str, object] = {"samples": None, "seed": 0}


def set_seed(seed: int) -> None:
    _state["seed"] = int(seed)


def set_samples(sample_ids_B: torch.Tensor | None) -> None:
    """The global dataset indices of the micro-batch's rows (None: no training batch)."""
    _state["samples"] = None if sample_ids_B is None else sample_ids_B.detach().to(torch.int64)


@contextmanager
def samples(sample_ids_B: torch.Tensor):
    previous = _state["samples"]
    set_samples(sample_ids_B)
    try:
        yield
    finally:
        _state["samples"] = previous


def current_seed() -> int:
    """The seed of the stochastic draws (``set_seed``; 0 until set)."""
    return int(_state["seed"])


def current_samples() -> torch.Tensor:
    ids = _state["samples"]
    if ids is None:
        raise RuntimeError(
            "a stochastic router ran in training mode but no training batch named its samples: "
            "call moe_parallel.model.routers.noise.set_samples(batch['sample_ids']) before the "
            "forward (train/step.py does), or put the model in eval mode"
        )
    return ids  # type: ignore[return-value]


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (xor-shift-multiply, "lowbias32"), on int64 tensors < 2**32.

    Products may pass 2**63 and wrap; only their low 32 bits are kept, which wrapping leaves
    exact."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def _combine(h: torch.Tensor, value: torch.Tensor | int) -> torch.Tensor:
    return mix32(h ^ (value & _MASK32 if isinstance(value, torch.Tensor) else value & _MASK32))


def token_uniforms(
    layer: int, draw: int, seq_offset: int, seq_len: int, width: int, device: torch.device
) -> torch.Tensor:
    """Uniforms in (0, 1), float64, shape [S, B, width], for the named micro-batch.

    ``seq_offset``: position of the first local token in the full sequence (sequence
    parallelism gives each tensor-parallel rank a contiguous slice)."""
    ids_B = current_samples().to(device)
    seed = int(_state["seed"])
    h = mix32(torch.tensor(seed & _MASK32, dtype=torch.int64, device=device))
    h = _combine(_combine(h, seed >> 32), layer)
    h = _combine(h, draw)
    h_B = _combine(_combine(h, ids_B), ids_B >> 32)  # [B]
    pos_S = torch.arange(seq_offset, seq_offset + seq_len, device=device, dtype=torch.int64)
    h_SB = _combine(h_B.unsqueeze(0), pos_S.unsqueeze(1))  # [S, B]
    col_W = torch.arange(width, device=device, dtype=torch.int64)
    h_SBW = _combine(h_SB.unsqueeze(-1), col_W)  # [S, B, W]
    return (h_SBW.to(torch.float64) + 0.5) / float(1 << 32)
