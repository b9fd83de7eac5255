"""GRIN's SparseMixer-v2 router (Liu et al., arXiv 2409.12136, section 3.1 and appendix A).

Top-2 routing in which each expert is *sampled* during training instead of taken as the argmax,
and the router gets a gradient for that discrete choice from the paper's estimator instead of
the straight-through gradient of a softmax over the kept logits:

1. Mask: experts whose logit trails the largest by more than a relative threshold,
   (max - z_i) / max(|z_i|, max) > 2 * eps, are excluded (GRIN/PhiMoE: eps = router jitter 0.01).
2. Choose: training samples from the softmax over the unmasked logits (Gumbel-max); evaluation
   takes the argmax (deterministic).
3. Weight: the chosen expert's masked-softmax probability pi_c. In training it is multiplied in
   the forward by omega = 1 when the sample is the argmax or with probability 1/4, else 1/3
   (the Heun third-order mixing of the paper's algorithm 1); the backward is the gradient of
   pi_c itself, d pi_c / d z_j = pi_c (1[j = c] - pi_j), so every unmasked expert, chosen or
   not, gets a gradient, and masked ones get none.
4. The second expert repeats 1-3 with the first expert removed (its logit set to -inf and the
   mask recomputed against the new maximum); its gradient also flows into the original logits.

The values, masks and estimator follow the public PhiMoE implementation in ``transformers``
(``sparsemixer``); the code is ours. The random draws come from routers/noise.py (keyed by token
identity), so every parallel layout routes a token the same way.

Shapes: T tokens, E experts, K=2 choices.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from megatron.core import parallel_state
from megatron.core.transformer.moe.moe_utils import (
    apply_router_token_dropping,
    compute_routing_scores_for_aux_loss,
)
from megatron.core.transformer.moe.router import TopKRouter

from . import noise

HEUN_KEEP_PROBABILITY = 0.25  # a non-argmax sample keeps full weight with probability 1/4
HEUN_SCALE = 1.0 / 3.0  # ... and is scaled by 1/3 otherwise (GRIN, algorithm 1)


@dataclass
class SparseMixerDraws:
    """The uniforms one training forward consumes: Gumbel draws per (token, expert) for the two
    choices, and one Heun draw per token for each choice."""

    gumbel_1_TE: torch.Tensor
    gumbel_2_TE: torch.Tensor
    heun_1_T: torch.Tensor
    heun_2_T: torch.Tensor


class _ChosenGate(torch.autograd.Function):
    """Forward: pi_c * omega. Backward: d pi_c / d logits (omega is not differentiated)."""

    @staticmethod
    def forward(ctx, logits_TE, pi_TE, chosen_T1, omega_T1):
        pi_c_T1 = pi_TE.gather(-1, chosen_T1)
        ctx.save_for_backward(pi_TE, chosen_T1, pi_c_T1)
        return pi_c_T1 * omega_T1

    @staticmethod
    def backward(ctx, grad_T1):
        pi_TE, chosen_T1, pi_c_T1 = ctx.saved_tensors
        scaled_T1 = grad_T1 * pi_c_T1
        grad_TE = -pi_TE * scaled_T1
        grad_TE.scatter_add_(-1, chosen_T1, scaled_T1)
        return grad_TE, None, None, None


def _far_from_max(logits_TE: torch.Tensor, max_T1: torch.Tensor, threshold: float) -> torch.Tensor:
    return (max_T1 - logits_TE) / logits_TE.abs().clamp(min=max_T1) > threshold


def _gumbel(u: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return (-torch.log(-torch.log(u))).to(like.dtype)


def _one_choice(logits_TE, candidates_TE, threshold, gumbel_u_TE, heun_u_T):
    """One expert per token from ``candidates`` (logits with earlier choices at -inf)."""
    training = heun_u_T is not None
    # In training the gradient comes from _ChosenGate alone: nothing else needs a graph.
    with torch.no_grad() if training else nullcontext():
        with torch.no_grad():
            max_T1, argmax_T1 = candidates_TE.max(dim=-1, keepdim=True)
            far_TE = _far_from_max(logits_TE, max_T1, threshold)
        gates_TE = candidates_TE.masked_fill(far_TE, float("-inf"))
        pi_TE = torch.softmax(gates_TE, dim=-1)
    if not training:
        chosen_T1 = argmax_T1
        return pi_TE.gather(-1, chosen_T1), chosen_T1
    with torch.no_grad():
        chosen_T1 = (gates_TE + _gumbel(gumbel_u_TE, gates_TE)).argmax(-1, keepdim=True)
        keep_T1 = (chosen_T1 == pi_TE.argmax(-1, keepdim=True)) | (
            heun_u_T.unsqueeze(-1) > 1.0 - HEUN_KEEP_PROBABILITY
        )
        omega_T1 = torch.where(keep_T1, 1.0, HEUN_SCALE).to(pi_TE.dtype)
    return _ChosenGate.apply(logits_TE, pi_TE, chosen_T1, omega_T1), chosen_T1


def sparsemixer_v2_top2(
    logits_TE: torch.Tensor, threshold: float, draws: SparseMixerDraws | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, 2], experts [T, 2]). ``draws`` None = evaluation (deterministic top-2)."""
    train = draws is not None
    w1, e1 = _one_choice(
        logits_TE,
        logits_TE,
        threshold,
        draws.gumbel_1_TE if train else None,
        draws.heun_1_T if train else None,
    )
    without_first_TE = (
        logits_TE.detach().scatter(-1, e1, float("-inf"))
        if train
        else logits_TE.scatter(-1, e1, float("-inf"))
    )
    w2, e2 = _one_choice(
        logits_TE,
        without_first_TE,
        threshold,
        draws.gumbel_2_TE if train else None,
        draws.heun_2_T if train else None,
    )
    return torch.cat([w1, w2], dim=-1), torch.cat([e1, e2], dim=-1)


class SparseMixerRouter(TopKRouter):
    """Megatron's TopKRouter with the top-k choice replaced by SparseMixer-v2 (top-2 only)."""

    def __init__(self, config, pg_collection=None, *, jitter_eps: float) -> None:
        super().__init__(config=config, pg_collection=pg_collection)
        if self.topk != 2:
            raise ValueError(
                f"the sparsemixer router routes to exactly 2 experts; model.moe.top_k={self.topk}"
            )
        # The mask's relative threshold is twice the router jitter (PhiMoE: 2 * 0.01).
        self.threshold = 2.0 * jitter_eps

    def _uniforms(self, draw: int, seq_len: int, width: int) -> torch.Tensor:
        """[S, B, width] uniforms for this rank's slice of the sequence."""
        sp = self.config.sequence_parallel
        offset = parallel_state.get_tensor_model_parallel_rank() * seq_len if sp else 0
        return noise.token_uniforms(
            self.layer_number, draw, offset, seq_len, width, self.weight.device
        )

    def draws(self, seq_len: int, batch: int) -> SparseMixerDraws:
        E, T = self.num_experts, seq_len * batch
        u = [self._uniforms(i, seq_len, w).reshape(T, w) for i, w in enumerate((E, E, 1, 1))]
        return SparseMixerDraws(u[0], u[1], u[2].squeeze(-1), u[3].squeeze(-1))

    def apply_input_jitter(self, input: torch.Tensor) -> torch.Tensor:
        """Megatron's multiplicative jitter x * U(1 - eps, 1 + eps), drawn from the token-keyed
        noise (Megatron draws it from the rank's RNG stream, which depends on the layout)."""
        eps = self.config.moe_input_jitter_eps
        if eps is None or not self.training:
            return input
        u = self._uniforms(4, input.shape[0], input.shape[-1]).to(input.dtype)
        return input * (1.0 - eps + 2.0 * eps * u)

    def routing(self, logits: torch.Tensor, padding_mask: torch.Tensor | None = None):
        seq_len, batch = logits.shape[:2]
        logits_TE = logits.view(-1, self.num_experts)
        if padding_mask is not None:
            padding_mask = padding_mask.reshape(-1)
        logits_TE = self.apply_z_loss(logits_TE, padding_mask=padding_mask)
        draws = self.draws(seq_len, batch) if self.training else None
        weights_TK, experts_TK = sparsemixer_v2_top2(logits_TE, self.threshold, draws)
        probs_TE = torch.zeros_like(logits_TE).scatter(-1, experts_TK, weights_TK)
        routing_map_TE = torch.zeros_like(logits_TE, dtype=torch.bool).scatter(-1, experts_TK, True)
        if self.config.moe_expert_capacity_factor is not None:
            probs_TE, routing_map_TE = apply_router_token_dropping(
                probs_TE,
                routing_map_TE,
                router_topk=self.topk,
                capacity_factor=self.config.moe_expert_capacity_factor,
                drop_policy=self.config.moe_token_drop_policy,
                pad_to_capacity=self.config.moe_pad_expert_input_to_capacity,
            )
        if self.training and torch.is_grad_enabled() and self.is_aux_loss_enabled():
            probs_TE = self._balance(probs_TE, logits_TE, seq_len, batch, padding_mask)
        return probs_TE, routing_map_TE

    def _balance(self, probs_TE, logits_TE, seq_len, batch, padding_mask):
        """Megatron's load-balancing losses on the softmax over all experts (GRIN, section 3.3
        balances globally: model.moe.load_balancing=global_aux_loss)."""
        map_TE, scores_TE = compute_routing_scores_for_aux_loss(
            logits_TE, self.topk, self.score_function, padding_mask=padding_mask
        )
        masked = padding_mask is not None
        probs_TE = self._apply_aux_loss(probs_TE, scores_TE, map_TE, with_padding_mask=masked)
        probs_TE = self._apply_seq_aux_loss(
            probs_TE, scores_TE, map_TE, seq_len, batch, with_padding_mask=masked
        )
        return self._apply_global_aux_loss(probs_TE, scores_TE, map_TE, with_padding_mask=masked)
