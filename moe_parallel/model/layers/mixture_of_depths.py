"""Mixture-of-Depths (Raposo et al., Google DeepMind, arXiv 2404.02258).

In a routed block a scalar router scores every token, r_i = w . x_i, and only the top
k = ceil(capacity x S) tokens of each sequence (12.5% in the paper) pass through the block
(attention and MLP); the others skip it along the residual stream. A chosen token's update is
scaled by its router weight, which puts the router on the gradient path (paper section 3.4,
eq. 1):

    x_i' = x_i + r_i * f(X~)_i     if r_i is among the top k of its sequence
    x_i' = x_i                     otherwise

f is the whole Megatron block (attention + MLP, each with its own inner residual), run on the
chosen tokens only: they keep their original order, attention among them is causal, and each
gets its own position's rotary embedding, so a chosen token sees exactly the chosen tokens
before it. The block's MLP may be an MoE layer (MoDE, "staged": MoD routing around a block
whose MLP is MoE; paper section 3.3); its experts then see only the chosen tokens.

Top-k over a sequence is not causal (whether token i is chosen depends on later tokens'
scores). The paper's fix for sampling (section 3.5) is used in evaluation (``model.eval()``):

- ``causal: predictor`` (default): a small MLP on stop-gradient inputs, trained with binary
  cross-entropy to predict top-k membership, decides per token (logit > 0). Its loss reaches
  only its own weights (the LM loss is unchanged).
- ``causal: router_bce``: the same binary cross-entropy on the router's own logits (sigmoid(r)
  trained towards membership); evaluation takes r > 0. This loss reaches the router and the
  model (the paper: a small hit to the LM loss).

The auxiliary loss is attached to the layer's output with Megatron's ``MoEAuxLossAutoScaler``
(as the MoE router losses are), scaled by the micro-batch's token count under per-token loss
averaging, so its gradient is ``coeff x`` the token mean of the cross-entropy.

Evaluation chooses a variable number of tokens per sequence: they are gathered in order and
padded at the end to the longest selection of the micro-batch (and the same count on every
expert-parallel rank); causal attention keeps real tokens from seeing the padding, whose
outputs are dropped.

Layout: the layer needs the whole sequence on the rank (refused with sequence or context
parallelism in config/rules.py). Tensor parallelism without sequence parallelism replicates the
sequence on every TP rank: the router, its top-k and the predictor are computed identically
on each of them. Pipeline and expert parallelism are unaffected (each layer decides on its own
global layer number whether it is routed).

Shapes: S sequence, B batch (micro-batch), d hidden, K chosen tokens per sequence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
from megatron.core.transformer.transformer_layer import TransformerLayer
from megatron.core.utils import make_viewless_tensor


@dataclass(frozen=True)
class DepthRouting:
    """The MoD settings a layer needs (from ``model.mod``)."""

    routed_layers: tuple[int, ...]  # 0-based global layer indices that are routed
    capacity: float = 0.125
    causal: str = "predictor"  # or "router_bce"
    predictor_hidden_size: int = 64
    aux_loss_coeff: float = 0.01

    def tokens_per_sequence(self, seq_length: int) -> int:
        return routed_token_count(self.capacity, seq_length)


def routed_token_count(capacity: float, seq_length: int) -> int:
    """k = ceil(capacity x S), at least 1 (a small tolerance keeps 0.125 x 128 at 16)."""
    return max(1, min(seq_length, math.ceil(capacity * seq_length - 1e-9)))


class MoDPredictor(torch.nn.Module):
    """The paper's small auxiliary MLP: d -> h -> 1 (SiLU), on stop-gradient inputs."""

    def __init__(self, hidden_size: int, predictor_hidden_size: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(hidden_size, predictor_hidden_size, dtype=dtype)
        self.fc2 = torch.nn.Linear(predictor_hidden_size, 1, dtype=dtype)
        with torch.no_grad():  # the layout-invariant init (model/init.py) draws the weights
            self.fc1.bias.zero_()
            self.fc2.bias.zero_()

    def forward(self, x_SBd: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.silu(self.fc1(x_SBd.detach()))).squeeze(-1)


class MixtureOfDepthsLayer(TransformerLayer):
    """A Megatron TransformerLayer that, when its layer is routed, runs on the top-k tokens."""

    def __init__(
        self, config, submodules, layer_number: int = 1, *, routing: DepthRouting, **kwargs
    ) -> None:
        super().__init__(config, submodules, layer_number=layer_number, **kwargs)
        self.routing = routing
        self.is_routed = (self.layer_number - 1) in routing.routed_layers
        if not self.is_routed:
            return
        if config.sequence_parallel or config.context_parallel_size > 1:
            raise ValueError(
                "model.mod needs the whole sequence on each rank: "
                "parallel.sequence_parallel=false and parallel.context=1"
            )
        d = config.hidden_size
        self.mod_router = torch.nn.Linear(d, 1, bias=False, dtype=config.params_dtype)
        if routing.causal == "predictor":
            self.mod_predictor = MoDPredictor(d, routing.predictor_hidden_size, config.params_dtype)

    def sharded_state_dict(
        self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None
    ):
        """Checkpoint keys ``decoder.layers.<global layer>.mod_router.weight`` (and predictor).

        Megatron stacks a layer's tensors over all layers (axis 0 = layer number) when the
        block is homogeneous; the router and predictor exist only on routed layers, and a stack
        with holes is refused by the checkpoint's access validation. They are saved per layer
        instead (as Megatron saves every tensor of a non-homogeneous block)."""
        state = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        if not self.is_routed or not sharded_offsets:
            return state
        from megatron.core.transformer.utils import sharded_state_dict_default

        for name, module in self.named_children():
            if not name.startswith("mod_"):
                continue
            own = sharded_state_dict_default(
                module, f"{prefix}{name}.", (), metadata, tp_group=self.tp_group
            )  # TP rank 0 saves
            for tensor in own.values():
                # The block replaces ``prefix`` (decoder.layers.<local>.) by decoder.layers.
                tensor.key = f"{prefix}{self.layer_number - 1}.{tensor.key[len(prefix) :]}"
            state.update(own)
        return state

    # --- forward -----------------------------------------------------------------------------

    def forward(self, hidden_states, *args, **kwargs):
        if not self.is_routed:
            return super().forward(hidden_states, *args, **kwargs)
        if args:
            raise TypeError(
                "MixtureOfDepthsLayer takes its inputs by keyword (as TransformerBlock passes them)"
            )
        if (
            kwargs.get("attention_mask") is not None
            or kwargs.get("inference_context") is not None
            or kwargs.get("packed_seq_params") is not None
        ):
            raise ValueError(
                "Mixture-of-Depths layers support causal attention without an "
                "explicit mask, KV cache or packed sequences"
            )
        x_SBd = hidden_states
        S, B, d = x_SBd.shape
        logits_SB = self.mod_router(x_SBd).squeeze(-1)
        if self.training:
            k = self.routing.tokens_per_sequence(S)
            idx_KB = logits_SB.detach().topk(k, dim=0).indices.sort(dim=0).values
            valid_KB = torch.ones_like(idx_KB, dtype=torch.bool)
        else:
            idx_KB, valid_KB = self._causal_choice(x_SBd, logits_SB)
        out_SBd, context = self._run_block_on(x_SBd, logits_SB, idx_KB, valid_KB, kwargs)
        if self.training and torch.is_grad_enabled():
            out_SBd = self._attach_aux_loss(out_SBd, x_SBd, logits_SB, idx_KB)
        return make_viewless_tensor(
            out_SBd, requires_grad=out_SBd.requires_grad, keep_graph=True
        ), context

    def chosen_mask(self, x_SBd: torch.Tensor) -> torch.Tensor:
        """[S, B] bool: which tokens this layer would process (training: top-k; eval: causal)."""
        logits_SB = self.mod_router(x_SBd).squeeze(-1)
        if self.training:
            k = self.routing.tokens_per_sequence(x_SBd.shape[0])
            idx = logits_SB.topk(k, dim=0).indices
            return torch.zeros_like(logits_SB, dtype=torch.bool).scatter(0, idx, True)
        return self._causal_logits(x_SBd, logits_SB) > 0

    def _causal_logits(self, x_SBd, logits_SB):
        if self.routing.causal == "predictor":
            return self.mod_predictor(x_SBd)
        return logits_SB

    def _causal_choice(self, x_SBd, logits_SB):
        """Per token, from that token alone: the predictor's (or router's) logit > 0."""
        chosen_SB = self._causal_logits(x_SBd, logits_SB) > 0
        counts_B = chosen_SB.sum(0)
        K = torch.clamp(counts_B.max(), min=1).reshape(1)
        if self.is_moe_layer and parallel_state.get_expert_model_parallel_world_size() > 1:
            # The same token count on every expert-parallel rank (the dispatchers exchange them).
            torch.distributed.all_reduce(
                K,
                op=torch.distributed.ReduceOp.MAX,
                group=parallel_state.get_expert_model_parallel_group(),
            )
        K = int(K.item())
        # Chosen positions first, in order; padding slots point at the last position.
        S = x_SBd.shape[0]
        pos_SB = torch.arange(S, device=x_SBd.device).unsqueeze(1).expand_as(chosen_SB)
        order_KB = torch.where(chosen_SB, pos_SB, pos_SB + S).sort(dim=0).values[:K]
        valid_KB = order_KB < S
        return torch.where(valid_KB, order_KB, torch.full_like(order_KB, S - 1)), valid_KB

    def _run_block_on(self, x_SBd, logits_SB, idx_KB, valid_KB, kwargs):
        d = x_SBd.shape[-1]
        gather_KBd = idx_KB.unsqueeze(-1).expand(-1, -1, d)
        chosen_KBd = x_SBd.gather(0, gather_KBd)
        inner = dict(kwargs)
        rope = inner.get("rotary_pos_emb")
        if rope is not None:  # [S, 1, 1, r] -> each chosen token's own position [K, B, 1, r]
            inner["rotary_pos_emb"] = rope[:, 0, 0, :][idx_KB].unsqueeze(2)
        for name in ("rotary_pos_cos", "rotary_pos_sin", "rotary_pos_cos_sin"):
            if inner.get(name) is not None:
                raise ValueError(f"Mixture-of-Depths layers do not support {name}")
        padding = inner.get("padding_mask")
        if padding is not None:  # [B, S] -> [B, K]
            inner["padding_mask"] = padding.gather(1, idx_KB.t()) | ~valid_KB.t()
        block_KBd, context = super().forward(hidden_states=chosen_KBd, **inner)
        weight_KB = logits_SB.gather(0, idx_KB) * valid_KB
        update_KBd = weight_KB.unsqueeze(-1).to(block_KBd.dtype) * (block_KBd - chosen_KBd)
        return x_SBd.scatter_add(0, gather_KBd, update_KBd), context

    def _attach_aux_loss(self, out_SBd, x_SBd, logits_SB, idx_KB):
        target_SB = torch.zeros_like(logits_SB).scatter(0, idx_KB, 1.0)
        scores_SB = self._causal_logits(x_SBd, logits_SB)
        bce = F.binary_cross_entropy_with_logits(scores_SB.float(), target_SB.float())
        scale = self.routing.aux_loss_coeff
        if self.config.calculate_per_token_loss:
            scale = scale * logits_SB.numel()  # finalize_model_grads divides by the global count
        return MoEAuxLossAutoScaler.apply(out_SBd, bce * scale)
