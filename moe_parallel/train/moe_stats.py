"""Per-layer expert load and router losses of one step, summed over every rank.

Shapes: L layers (global numbering), E experts, T tokens of a micro-batch on this rank.
Every rank of a pipeline stage routes different tokens (MoE with TP requires sequence
parallelism; EP/DP/CP ranks hold different micro-batches), so a plain sum over all ranks of
the routing map gives global counts, each token counted top_k times.

Expert bias (auxiliary-loss-free balancing, ``model.moe.expert_bias``): a buffer every rank that
holds a router updates from the step's global load, so every such rank must hold the same values.
After each step the element-wise minimum and maximum over the ranks are compared
(``expert_bias_ranks_agree``) and each layer's sum is logged (``expert_bias_sum``), which a
layout must reproduce bit for bit.

Router entropy (``watch_router_entropy(True)``, monitor.enabled): per layer, the mean over the
step's tokens of the entropy (nats) of the softmax of the router's logits over the experts, read
from the router's ``gating`` output (whatever score function routes afterwards): log(E) for a
router that cannot tell experts apart, 0 for one that always picks the same expert.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.transformer.moe.moe_utils import (
    clear_aux_losses_tracker,
    get_moe_layer_wise_logging_tracker,
)
from megatron.core.transformer.moe.router import TopKRouter

# Names under which Megatron's routers record their losses (values are loss / coefficient).
ROUTER_LOSSES = (
    "load_balancing_loss",
    "seq_load_balancing_loss",
    "global_load_balancing_loss",
    "z_loss",
)


class ExpertLoad:
    """``num_layers``: the decoder's layers plus the multi-token prediction modules (Megatron
    numbers an MTP module's layer after the decoder's: its load is logged as layer
    ``num_layers - 1``), ``mtp_layers``: the MTP modules, whose losses are collected too,
    ``expert_bias``: the routers have one (the config's choice, the same on every rank: a stage
    without a router still joins the check's all-reduces)."""

    def __init__(
        self,
        model_chunks,
        num_layers: int,
        num_experts: int,
        device: torch.device,
        mtp_layers: int = 0,
        expert_bias: bool = False,
    ):
        self.tokens_LE = torch.zeros(num_layers, num_experts, dtype=torch.float64, device=device)
        self.num_layers = num_layers
        self.mtp_layers = mtp_layers
        # Router entropy of this step: one summed entropy per router call, its layer index and
        # token count (few tensor operations per call: on CPU ranks each costs microseconds).
        self.entropy_sums: list[torch.Tensor] = []
        self.entropy_layers: list[int] = []
        self.entropy_tokens_L = [0] * num_layers
        # Optional: a function returning a float64 tensor summed over the ranks together with
        # this step's counts (monitor/stragglers.py: per-rank times, without a collective of
        # their own); the sum of the last step is left in ``ride_along_sum``.
        self.ride_along = None
        self.ride_along_sum: torch.Tensor | None = None
        self.hooks = []
        self.routers = []
        self.num_experts = num_experts
        self.expert_bias = expert_bias
        self._gating_before: dict[TopKRouter, object] = {}
        for chunk in model_chunks:
            for module in chunk.modules():
                if isinstance(module, TopKRouter):
                    self.routers.append(module)
                    self.hooks.append(module.register_forward_hook(self._count))

    def watch_router_entropy(self, on: bool) -> None:
        """Wrap (or unwrap) every router's ``gating`` to accumulate the entropy of its logits."""
        for router in self.routers:
            if on and router not in self._gating_before:
                self._gating_before[router] = router.__dict__.get("gating")
                router.gating = self._entropy_gating(router, router.gating)
            elif not on and router in self._gating_before:
                before = self._gating_before.pop(router)
                if before is None:
                    del router.gating  # the class's method again
                else:
                    router.gating = before

    def _entropy_gating(self, router, gating):
        def gating_with_entropy(input):
            logits = gating(input)
            if router.training:
                with torch.no_grad():
                    logits_TE = logits.reshape(-1, logits.shape[-1])
                    probs_TE = torch.softmax(logits_TE, dim=-1, dtype=torch.float64)
                    self.entropy_sums.append(torch.special.entr(probs_TE).sum())
                self.entropy_layers.append(router.layer_number - 1)
                self.entropy_tokens_L[router.layer_number - 1] += logits_TE.shape[0]
            return logits

        return gating_with_entropy

    def _count(self, router, inputs, outputs):
        if not router.training:
            return
        _, routing_map_TE = outputs
        self.tokens_LE[router.layer_number - 1] += routing_map_TE.sum(dim=0).to(torch.float64)

    def collect(self, num_microbatches: int) -> dict:
        """Reduce this step's counts and router losses over all ranks; reset for the next step."""
        losses_NL = self._router_losses()
        entropy_L2 = self._take_entropy()
        mtp_D = self._mtp_losses()
        extra = (
            torch.zeros(0, dtype=torch.float64, device=self.tokens_LE.device)
            if self.ride_along is None
            else self.ride_along().to(self.tokens_LE.device)
        )
        parts = (self.tokens_LE, entropy_L2, losses_NL, mtp_D, extra)
        packed = torch.cat([part.reshape(-1) for part in parts])
        torch.distributed.all_reduce(packed)
        tokens_LE, entropy_L2, losses_NL, mtp_D, extra = (
            part.reshape(like.shape).cpu()
            for part, like in zip(packed.split([part.numel() for part in parts]), parts)
        )
        self.ride_along_sum = extra if self.ride_along is not None else None
        self.tokens_LE.zero_()
        clear_aux_losses_tracker()
        moe_layers = [i for i in range(self.num_layers) if tokens_LE[i].sum() > 0]
        out = {
            "tokens_per_expert": {i: tokens_LE[i].tolist() for i in moe_layers},
            **self._loss_means(losses_NL, moe_layers, num_microbatches),
        }
        if self.mtp_layers:
            out["mtp_loss"] = self._mtp_mean(mtp_D, num_microbatches)
        if self.expert_bias:
            out["expert_bias_sum"], out["expert_bias_ranks_agree"] = self._expert_bias_check()
        if self._gating_before:
            out["router_entropy"] = {
                i: float(entropy_L2[i, 0] / entropy_L2[i, 1])
                for i in moe_layers
                if entropy_L2[i, 1] > 0
            }
        return out

    def _expert_bias_check(self) -> tuple[dict, bool]:
        """Per layer, the sum of its expert bias, and whether every rank holding that layer's
        router holds the same bias (element-wise min and max over all ranks equal; a rank
        without the layer contributes +inf / -inf). Two small all-reduces, only with the bias."""
        device = self.tokens_LE.device
        shape = (self.num_layers, self.num_experts)
        low_LE = torch.full(shape, torch.inf, dtype=torch.float64, device=device)
        high_LE = torch.full(shape, -torch.inf, dtype=torch.float64, device=device)
        for router in self.routers:
            bias = getattr(router, "expert_bias", None)
            if bias is not None:
                low_LE[router.layer_number - 1] = bias.double()
                high_LE[router.layer_number - 1] = bias.double()
        torch.distributed.all_reduce(low_LE, op=torch.distributed.ReduceOp.MIN)
        torch.distributed.all_reduce(high_LE, op=torch.distributed.ReduceOp.MAX)
        held = [i for i in range(self.num_layers) if torch.isfinite(high_LE[i]).all()]
        agree = all(torch.equal(low_LE[i], high_LE[i]) for i in held)
        return {i: float(high_LE[i].sum()) for i in held}, agree

    def _take_entropy(self) -> torch.Tensor:
        """[L, 2]: this rank's entropy sum and token count per layer; resets them."""
        device = self.tokens_LE.device
        out_L2 = torch.zeros(self.num_layers, 2, dtype=torch.float64, device=device)
        if self.entropy_sums:
            out_L2[:, 0].index_add_(
                0, torch.tensor(self.entropy_layers, device=device), torch.stack(self.entropy_sums)
            )
            out_L2[:, 1] = torch.tensor(self.entropy_tokens_L, dtype=torch.float64)
        self.entropy_sums, self.entropy_layers = [], []
        self.entropy_tokens_L = [0] * self.num_layers
        return out_L2

    def _router_losses(self) -> torch.Tensor:
        tracker = get_moe_layer_wise_logging_tracker()
        out = torch.zeros(
            len(ROUTER_LOSSES), self.num_layers, dtype=torch.float64, device=self.tokens_LE.device
        )
        for n, name in enumerate(ROUTER_LOSSES):
            if name in tracker:
                out[n] = tracker[name]["values"][: self.num_layers].to(out)
        return out

    def _mtp_losses(self) -> torch.Tensor:
        """[D]: this rank's MTP losses of the step (Megatron's tracker: per module, the sum over
        micro-batches of each one's mean token loss; zero off the last stage); resets them."""
        from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

        out = torch.zeros(self.mtp_layers, dtype=torch.float64, device=self.tokens_LE.device)
        values = MTPLossLoggingHelper.tracker.get("values")
        if values is not None:
            out += values[: self.mtp_layers].to(out)
            MTPLossLoggingHelper.clean_loss_in_tracker()
        return out

    @staticmethod
    def _mtp_mean(mtp_D: torch.Tensor, num_microbatches: int) -> float:
        # Each tensor-parallel rank of the last stage holds the whole loss (vocabulary-parallel
        # cross entropy); each data-parallel rank and micro-batch one mean: average over those.
        ranks = (
            parallel_state.get_data_parallel_world_size()
            * parallel_state.get_tensor_model_parallel_world_size()
        )
        return float(mtp_D.mean() / (ranks * num_microbatches))

    @staticmethod
    def _loss_means(losses_NL, moe_layers, num_microbatches) -> dict:
        # Tensor/context-parallel ranks hold partial terms that add up to a micro-batch's loss;
        # data-parallel ranks and micro-batches each hold a whole one: average over those. The
        # global loss is one loss over the data-parallel ranks' micro-batches together (its
        # counts are summed over tp x dp x cp): its data-parallel terms add up too.
        dp = parallel_state.get_data_parallel_world_size()
        tp_cp = (
            parallel_state.get_tensor_model_parallel_world_size()
            * parallel_state.get_context_parallel_world_size()
        )
        out = {}
        for n, name in enumerate(ROUTER_LOSSES):
            if not moe_layers or losses_NL[n].abs().sum() == 0:
                continue
            dp_terms = 1 if name == "global_load_balancing_loss" else dp
            per_layer = losses_NL[n, moe_layers] / (dp_terms * num_microbatches)
            if name == "z_loss":
                per_layer = per_layer / tp_cp  # each TP rank records its own token mean
            out[name] = float(per_layer.mean())
        return out


def imbalance(tokens_per_expert: dict) -> dict:
    """max/mean tokens per expert, per layer (1.0 = perfectly balanced)."""
    out = {}
    for layer, counts in tokens_per_expert.items():
        mean = sum(counts) / len(counts)
        out[layer] = max(counts) / mean if mean else 0.0
    return out
