"""Which parameters train: ``train.trainable``.

``adapters_and_routers`` is PESC's tuning (arXiv 2401.02731): only the adapter experts and the
routers of adapter MoE layers (model/layers/adapter_experts.py) learn; every other parameter
(embeddings, attention, norms, the shared FFNs, the output layer) gets ``requires_grad=False``
before Megatron's DDP and optimizer are built, so it has no gradient buffer, no optimizer state
and is never written by an optimizer step: it stays bit-identical through training.
"""

from __future__ import annotations

import torch

from .layers.adapter_experts import AdapterMoELayer


def trained_by_pesc(param_name: str) -> bool:
    """An adapter MoE layer's expert or router parameter (name relative to the layer)."""
    return param_name.startswith(("experts.", "router."))


def apply_trainable(chunks: list[torch.nn.Module], mode: str) -> int:
    """Freeze what ``mode`` does not train; returns the number of trainable parameters."""
    if mode == "all":
        return sum(p.numel() for c in chunks for p in c.parameters())
    if mode != "adapters_and_routers":
        raise ValueError(
            f"train.trainable={mode!r}: allowed values are 'all', 'adapters_and_routers'"
        )
    keep: set[int] = set()
    for chunk in chunks:
        for name, module in chunk.named_modules():
            if isinstance(module, AdapterMoELayer):
                keep |= {id(p) for n, p in module.named_parameters() if trained_by_pesc(n)}
    if not keep and any(True for c in chunks for _ in c.parameters()):
        # A pipeline stage may hold no MoE layer; it then trains nothing (refused: it would idle).
        raise ValueError(
            "train.trainable=adapters_and_routers: this rank's model chunks hold no "
            "adapter MoE layer (model.moe.expert_kind=adapter, layer_freq)"
        )
    for chunk in chunks:
        for p in chunk.parameters():
            p.requires_grad_(id(p) in keep)
    return sum(p.numel() for c in chunks for p in c.parameters() if p.requires_grad)
