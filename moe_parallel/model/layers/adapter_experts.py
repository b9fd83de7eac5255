"""PESC's MoE layer: adapter experts around one shared FFN (Wu et al., arXiv 2401.02731).

Parameter-Efficient Sparsity Crafting turns a dense model's FFN into an MoE layer without copying
it: every token goes through the dense FFN (shared, the upcycled weights), and the routed experts
are small adapters on that FFN's output h. In the paper's notation (section 2, eqs. 7-9) and
its released code (``camelidae/modeling_camelidae.py``: ``CamelidaeGateAdapter``):

    h      = FFN(x)                                   the shared (dense) FFN, every token
    A_i(h) = s * act(h W_down_i) W_up_i + h           adapter i with its own residual
    g      = softmax(top-k(x W_router))               the router sees the FFN's *input* x
    y      = sum_{i in top-k} g_i A_i(h)
           = (sum g_i) h + sum g_i s act(h W_down_i) W_up_i

``s`` is ``model.moe.moe_scaling`` (0.25 in the released Camelidae configs), ``act`` GELU,
``W_down`` [d, a] and ``W_up`` [a, d] without bias, a the adapter dimension (512). With the
renormalised top-k weights (``pre_softmax: false``) sum g_i = 1 and y = h + sum g_i s A'_i(h);
the layer computes the general form above, so a softmax over all experts (weights summing to
less than 1) gives the paper's equation too. Dropout (``adapter_dropout``, 0.1 in Camelidae)
applies to the adapters' input only, never to the residual h.

How it maps onto Megatron-core: ``AdapterMoELayer`` is an ``MoELayer`` whose experts are
Megatron expert MLPs of width a, non-gated, with the adapter activation (so they shard over
expert-parallel ranks, and over expert-tensor-parallel ranks along a, exactly like FFN experts,
and checkpoint and reshard the same way). The token dispatcher carries h instead of x; the
routing weights it applies are g_i * s; the residual (sum g_i) h is added after the combine.
The shared FFN is a plain Megatron MLP (tensor + sequence parallel like a shared expert) under
``mlp.shared_ffn``: an upcycled dense checkpoint's ``mlp.linear_fc1/2`` go there.

Shapes: S sequence (sequence-parallel slice), B micro-batch, T = S*B tokens, E experts,
d hidden, a adapter dimension.
"""

from __future__ import annotations

import logging
from copy import copy
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
from megatron.core.transformer.transformer_config import TransformerConfig

ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}


def adapter_config(
    config: TransformerConfig, adapter_dim: int, activation: str
) -> TransformerConfig:
    """The experts' config: non-gated MLPs of width ``adapter_dim`` without biases."""
    cfg = copy(config)
    cfg.moe_ffn_hidden_size = adapter_dim
    cfg.ffn_hidden_size = adapter_dim
    cfg.gated_linear_unit = False
    cfg.activation_func = ACTIVATIONS[activation]
    cfg.add_bias_linear = False
    cfg.bias_activation_fusion = False
    return cfg


def shared_ffn_config(config: TransformerConfig) -> TransformerConfig:
    """The shared FFN: the model's FFN (activation, gating, biases) of the expert width."""
    cfg = copy(config)
    cfg.ffn_hidden_size = config.moe_ffn_hidden_size
    return cfg


class AdapterMoELayer(MoELayer):
    """``model.moe.expert_kind: adapter``: see the module docstring."""

    def __init__(
        self,
        config: TransformerConfig,
        submodules: Optional[MoESubmodules] = None,
        layer_number: Optional[int] = None,
        pg_collection=None,
        *,
        adapter_dim: int,
        activation: str = "gelu",
        moe_scaling: float = 1.0,
        dropout: float = 0.0,
    ) -> None:
        if pg_collection is None:  # Megatron passes it to MoELayer only (an exact type check)
            pg_collection = get_default_pg_collection()
        if config.moe_shared_expert_intermediate_size is not None:
            raise ValueError(
                "adapter experts have their own shared FFN: unset "
                "model.moe.shared_expert_ffn_hidden_size"
            )
        # The experts Megatron builds are the adapters; everything else is the MoE layer's own.
        super().__init__(
            adapter_config(config, adapter_dim, activation), submodules, layer_number, pg_collection
        )
        self.config = config  # routing, dispatch and the shared FFN use the model's config
        self.router.config = config
        self.moe_scaling = float(moe_scaling)
        self.adapter_dropout = float(dropout)
        self.shared_ffn = MLP(
            shared_ffn_config(config),
            submodules.shared_experts.submodules,
            ffn_hidden_size=config.moe_ffn_hidden_size,
            tp_group=pg_collection.tp,
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        intermediate_tensors=None,
        padding_mask: Optional[torch.Tensor] = None,
    ):
        if intermediate_tensors is not None:
            raise NotImplementedError("adapter experts do not support partial CUDA-graph capture")
        if padding_mask is not None:
            padding_mask = padding_mask.transpose(0, 1).bool()
        x_SBd = hidden_states
        h_SBd, bias = self.shared_ffn(x_SBd)
        if bias is not None:
            h_SBd = h_SBd + bias
        probs_TE, routing_map_TE = self.route(x_SBd, padding_mask)  # the router sees the FFN input
        gate_sum_T = (probs_TE * routing_map_TE).sum(-1)
        adapter_in = h_SBd
        if self.training and self.adapter_dropout > 0:
            adapter_in = F.dropout(h_SBd, p=self.adapter_dropout, training=True)
        routed, probs = self.preprocess(adapter_in, probs_TE * self.moe_scaling, routing_map_TE)
        routed, probs = self.dispatch(routed, probs)
        routed, _ = self.routed_experts_compute(routed, probs)
        routed = self.postprocess(self.combine(routed), None)
        residual = gate_sum_T.view(*h_SBd.shape[:-1], 1) * h_SBd
        return (routed + residual).to(h_SBd.dtype), None


def adapter_layer_spec(
    mlp_spec, adapter_dim: int, activation: str, moe_scaling: float, dropout: float
):
    """The MoE spec entry with ``AdapterMoELayer`` in place of Megatron's ``MoELayer``."""
    from dataclasses import replace

    _quiet_unknown_mlp_type()
    params = dict(mlp_spec.params or {})
    params.update(
        adapter_dim=adapter_dim, activation=activation, moe_scaling=moe_scaling, dropout=dropout
    )
    return replace(mlp_spec, module=AdapterMoELayer, params=params)


class _UnknownMlpType(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Unknown MLP type" not in record.getMessage()


def _quiet_unknown_mlp_type() -> None:
    """Megatron's TransformerLayer passes ``pg_collection`` only to an exact ``MoELayer`` and
    logs "Unknown MLP type" for a subclass; the layer takes Megatron's default groups instead
    (the same ones), so the message is noise."""
    logger = logging.getLogger("megatron.core.transformer.transformer_layer")
    if not any(isinstance(f, _UnknownMlpType) for f in logger.filters):
        logger.addFilter(_UnknownMlpType())
