"""Routers selected by ``model.moe.router``: each a Megatron router class for MoESubmodules."""

from __future__ import annotations

from functools import partial

from megatron.core.transformer.moe.router import TopKRouter


def router_builder(name: str, sparsemixer_jitter_eps: float = 0.01):
    """The callable Megatron's MoELayer builds its router with (config=..., pg_collection=...)."""
    if name == "topk":
        return TopKRouter
    if name == "attention":
        from .attention import AttentionRouter

        return AttentionRouter
    if name == "sparsemixer":
        from .sparsemixer import SparseMixerRouter

        return partial(SparseMixerRouter, jitter_eps=sparsemixer_jitter_eps)
    raise ValueError(
        f"model.moe.router={name!r}: allowed values are 'topk', 'attention', 'sparsemixer'"
    )
