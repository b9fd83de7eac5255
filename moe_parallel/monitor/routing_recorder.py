"""Record the routing of every MoE layer during forwards: the experts each token chose (before
any capacity dropping), their routing weights, the tokens dropped by a static capacity, and the
token counts the experts actually received (padding included).

Legend: T tokens of one forward (Megatron's [S, B] flattened, token s * B + b), K top_k,
E experts, E_local experts on this rank.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch
from megatron.core.transformer.moe import router as megatron_router
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.router import TopKRouter


class RoutingRecorder:
    """``with RoutingRecorder(model) as rec: model(...)``; then ``rec.experts()`` etc.

    Per layer (global 1-based layer number) and forward: ``choices`` experts_TK (int32, ascending
    expert id per token), ``weights`` probs_TK, ``dropped`` (routed token-expert pairs removed by
    the capacity), ``received`` tokens_per_expert_E_local entering this rank's experts.
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.choices: dict[int, list[np.ndarray]] = defaultdict(list)
        self.weights: dict[int, list[np.ndarray]] = defaultdict(list)
        self.dropped: dict[int, list[int]] = defaultdict(list)
        self.received: dict[int, list[np.ndarray]] = defaultdict(list)
        self.forward_tokens: list[int] = []
        self._handles, self._pre_drop = [], None

    # -- results -------------------------------------------------------------------------------
    def experts(self) -> dict[int, np.ndarray]:
        return {layer: np.concatenate(v) for layer, v in sorted(self.choices.items())}

    def probs(self) -> dict[int, np.ndarray]:
        return {layer: np.concatenate(v) for layer, v in sorted(self.weights.items())}

    def dropped_per_layer(self) -> dict[int, int]:
        return {layer: int(sum(v)) for layer, v in sorted(self.dropped.items())}

    # -- hooks ---------------------------------------------------------------------------------
    def __enter__(self) -> "RoutingRecorder":
        for module in self.model.modules():
            if isinstance(module, TopKRouter):
                self._handles.append(module.register_forward_hook(self._after_router))
            if isinstance(module, MoELayer):
                layer = module.layer_number
                self._handles.append(
                    module.experts.register_forward_pre_hook(
                        lambda _m, args, layer=layer: self._before_experts(layer, args)
                    )
                )
        self._original_drop = megatron_router.apply_router_token_dropping
        megatron_router.apply_router_token_dropping = self._dropping
        return self

    def __exit__(self, *exc) -> None:
        megatron_router.apply_router_token_dropping = self._original_drop
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _dropping(self, probs_TE, routing_map_TE, *args, **kwargs):
        self._pre_drop = (probs_TE.detach(), routing_map_TE.detach())
        return self._original_drop(probs_TE, routing_map_TE, *args, **kwargs)

    def _after_router(self, router: TopKRouter, _inputs, outputs) -> None:
        probs_TE, map_TE = (t.detach() for t in outputs)
        if self._pre_drop is not None:  # static capacity: the choices before dropping
            (probs_TE, chosen_TE), self._pre_drop = self._pre_drop, None
            self.dropped[router.layer_number].append(int((chosen_TE & ~map_TE).sum()))
        else:
            chosen_TE = map_TE
            self.dropped[router.layer_number].append(0)
        k = router.topk
        counts_T = chosen_TE.sum(dim=1)
        if not bool((counts_T == k).all()):
            raise RuntimeError(
                f"layer {router.layer_number}: a token chose "
                f"{int(counts_T.min())}..{int(counts_T.max())} experts, not {k}"
            )
        experts_TK = chosen_TE.nonzero()[:, 1].view(-1, k)  # row-major: ascending expert ids
        self.choices[router.layer_number].append(experts_TK.to(torch.int32).cpu().numpy())
        self.weights[router.layer_number].append(
            probs_TE.gather(1, experts_TK).float().cpu().numpy()
        )
        if router.layer_number == min(self.choices):
            self.forward_tokens.append(int(chosen_TE.shape[0]))

    def _before_experts(self, layer: int, args) -> None:
        tokens_per_expert = args[1]
        self.received[layer].append(torch.as_tensor(tokens_per_expert).cpu().numpy().copy())
