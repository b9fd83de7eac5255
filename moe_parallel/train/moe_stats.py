"""Per-layer expert load and router losses of one step, summed over every rank.

Shapes: L layers (global numbering), E experts, T tokens of a micro-batch on this rank.
Every rank of a pipeline stage routes different tokens (MoE with TP requires sequence
parallelism; EP/DP/CP ranks hold different micro-batches), so a plain sum over all ranks of
the routing map gives global counts, each token counted top_k times.
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
ROUTER_LOSSES = ("load_balancing_loss", "seq_load_balancing_loss", "global_load_balancing_loss",
                 "z_loss")


class ExpertLoad:
    def __init__(self, model_chunks, num_layers: int, num_experts: int, device: torch.device):
        self.tokens_LE = torch.zeros(num_layers, num_experts, dtype=torch.float64, device=device)
        self.num_layers = num_layers
        self.hooks = []
        for chunk in model_chunks:
            for module in chunk.modules():
                if isinstance(module, TopKRouter):
                    self.hooks.append(module.register_forward_hook(self._count))

    def _count(self, router, inputs, outputs):
        if not router.training:
            return
        _, routing_map_TE = outputs
        self.tokens_LE[router.layer_number - 1] += routing_map_TE.sum(dim=0).to(torch.float64)

    def collect(self, num_microbatches: int) -> dict:
        """Reduce this step's counts and router losses over all ranks; reset for the next step."""
        losses_NL = self._router_losses()
        packed = torch.cat([self.tokens_LE.reshape(-1), losses_NL.reshape(-1)])
        torch.distributed.all_reduce(packed)
        tokens_LE = packed[: self.tokens_LE.numel()].reshape(self.tokens_LE.shape).cpu()
        losses_NL = packed[self.tokens_LE.numel():].reshape(losses_NL.shape).cpu()
        self.tokens_LE.zero_()
        clear_aux_losses_tracker()
        moe_layers = [i for i in range(self.num_layers) if tokens_LE[i].sum() > 0]
        return {
            "tokens_per_expert": {i: tokens_LE[i].tolist() for i in moe_layers},
            **self._loss_means(losses_NL, moe_layers, num_microbatches),
        }

    def _router_losses(self) -> torch.Tensor:
        tracker = get_moe_layer_wise_logging_tracker()
        out = torch.zeros(len(ROUTER_LOSSES), self.num_layers, dtype=torch.float64,
                          device=self.tokens_LE.device)
        for n, name in enumerate(ROUTER_LOSSES):
            if name in tracker:
                out[n] = tracker[name]["values"][: self.num_layers].to(out)
        return out

    @staticmethod
    def _loss_means(losses_NL, moe_layers, num_microbatches) -> dict:
        # Tensor/context-parallel ranks hold partial terms that add up to a micro-batch's loss;
        # data-parallel ranks and micro-batches each hold a whole one: average over those.
        dp = parallel_state.get_data_parallel_world_size()
        tp_cp = (parallel_state.get_tensor_model_parallel_world_size()
                 * parallel_state.get_context_parallel_world_size())
        out = {}
        for n, name in enumerate(ROUTER_LOSSES):
            if not moe_layers or losses_NL[n].abs().sum() == 0:
                continue
            per_layer = losses_NL[n, moe_layers] / (dp * num_microbatches)
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
