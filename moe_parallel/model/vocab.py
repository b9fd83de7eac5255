"""The vocabulary a model is built for (no Megatron import: the planner uses it too)."""

from __future__ import annotations

import math

from moe_parallel.config import RunConfig


def padded_vocab_size(vocab: int, tensor_parallel: int) -> int:
    """Megatron's rule: pad to a multiple of 128 x TP (the same for any power-of-two TP <= 128)."""
    multiple = math.lcm(128, tensor_parallel)
    return ((vocab + multiple - 1) // multiple) * multiple


def model_vocab_size(cfg: RunConfig) -> int:
    """``model.vocab_size`` when set (a converted checkpoint's), else the run's tokenizer's,
    unpadded (prepares the data if needed)."""
    if cfg.model.vocab_size is not None:
        return cfg.model.vocab_size
    from moe_parallel.data import prepare

    return prepare(cfg.data).vocab_size
