"""Expert buffering (Huang et al., arXiv 2303.06182, section "Expert Buffering").

All experts of a MoE layer live in host memory; a fixed number of *slots* (``budget``) in a
separate preallocated arena ("device" memory: the GPU when there is one, a second CPU tensor pool
otherwise) hold the experts being computed. Per batch the active experts are known from the
routing (the per-expert token counts, i.e. the counts all-to-all); experts run one after another
in ascending id order, each reading its weights from its slot. On a miss the expert's weights are
copied host -> slot; when no slot is free one resident expert is evicted:

1. first an expert *inactive* in the current batch (the most recently used such expert), else
2. LIFO: the most recently used resident expert (in the serial ascending order this is the
   expert just computed, the one with the longest reuse distance within the batch).

"Most recently used" = pushed on a stack at every load or hit. Eviction moves no bytes (the host
copy is the master); ``bytes_moved`` counts host -> slot copies only. Because experts run one at
a time, any ``budget >= 1`` is correct, including ``budget`` below the number of active experts:
such a batch simply misses more (the paper's serial execution; no waves are needed).

Legend: T tokens, E experts, K top_k, D hidden size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch
from torch.func import functional_call


@dataclass
class BufferStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    bytes_moved: int = 0
    batches: int = 0

    def as_dict(self) -> dict:
        return {
            "hits": self.hits,
            "misses": self.misses,
            "evictions": self.evictions,
            "bytes_moved": self.bytes_moved,
            "batches": self.batches,
        }


class ExpertCachePolicy:
    """Which expert sits in which slot: the paper's policy, bookkeeping only (no tensors)."""

    def __init__(self, budget: int):
        if budget < 1:
            raise ValueError(f"budget={budget}: at least one expert slot is needed")
        self.budget = budget
        self.slot_of: dict[int, int] = {}
        self.stack: list[int] = []  # resident experts, most recently used last
        self.active: frozenset[int] = frozenset()
        self.stats = BufferStats()

    def begin_batch(self, active_experts: Iterable[int]) -> list[int]:
        """Start a batch; returns its active experts in execution (ascending) order."""
        order = sorted({int(e) for e in active_experts})
        self.active = frozenset(order)
        self.stats.batches += 1
        return order

    def lookup(self, expert: int) -> tuple[int, bool]:
        """The slot holding ``expert`` and whether it must be loaded (a miss)."""
        if expert in self.slot_of:
            self.stats.hits += 1
            self.stack.remove(expert)
            self.stack.append(expert)
            return self.slot_of[expert], False
        self.stats.misses += 1
        if len(self.slot_of) < self.budget:
            slot = min(set(range(self.budget)) - set(self.slot_of.values()))
        else:
            slot = self.slot_of.pop(self._victim())
            self.stats.evictions += 1
        self.slot_of[expert] = slot
        self.stack.append(expert)
        return slot, True

    def _victim(self) -> int:
        inactive = [e for e in self.stack if e not in self.active]
        victim = inactive[-1] if inactive else self.stack[-1]
        self.stack.remove(victim)
        return victim


class ExpertBuffer:
    """Host-resident expert weights + a ``budget``-slot arena on ``device``, with the policy.

    ``host``: one dict per expert, parameter name -> tensor (same names and shapes for all).
    """

    def __init__(
        self, host: list[dict[str, torch.Tensor]], budget: int, device: str | torch.device = "cpu"
    ):
        self.policy = ExpertCachePolicy(budget)
        self.device = torch.device(device)
        pin = self.device.type == "cuda"
        self.host = [
            {n: (t.detach().pin_memory() if pin else t.detach()) for n, t in e.items()}
            for e in host
        ]
        first = self.host[0]
        self.arena = {
            n: torch.empty((budget, *t.shape), dtype=t.dtype, device=self.device)
            for n, t in first.items()
        }
        self.expert_bytes = sum(t.numel() * t.element_size() for t in first.values())

    @property
    def stats(self) -> BufferStats:
        return self.policy.stats

    def begin_batch(self, active_experts: Iterable[int]) -> list[int]:
        return self.policy.begin_batch(active_experts)

    def fetch(self, expert: int) -> dict[str, torch.Tensor]:
        """The expert's weights as views of its slot (copied there on a miss)."""
        slot, miss = self.policy.lookup(expert)
        if miss:
            for name, tensor in self.host[expert].items():
                self.arena[name][slot].copy_(tensor, non_blocking=True)
            self.policy.stats.bytes_moved += self.expert_bytes
        return {name: arena[slot] for name, arena in self.arena.items()}


def replay_trace(experts_TK_batches: Iterable[np.ndarray], budget: int) -> BufferStats:
    """The policy alone over a routing trace cut into batches (each int [tokens, top_k])."""
    policy = ExpertCachePolicy(budget)
    for experts_TK in experts_TK_batches:
        for expert in policy.begin_batch(np.unique(np.asarray(experts_TK))):
            policy.lookup(expert)
    return policy.stats


class BufferedSequentialMLP(torch.nn.Module):
    """Drop-in for a Megatron ``SequentialMLP`` (inference): same forward, weights from slots.

    The wrapped module's experts keep their host parameters (the master copy); each expert's
    computation is its own Megatron MLP run by ``functional_call`` on the slot's tensors.
    """

    def __init__(self, experts: torch.nn.Module, budget: int, device: str | torch.device = "cpu"):
        super().__init__()
        config = experts.config
        if config.fp8 or getattr(config, "fp4", None) or config.moe_apply_probs_on_input:
            raise ValueError(
                "expert buffering supports SequentialMLP without fp8/fp4 and "
                "without moe_apply_probs_on_input"
            )
        self.config = config
        self.inner = experts
        host = [dict(e.named_parameters()) for e in experts.local_experts]
        self.buffer = ExpertBuffer(host, budget, device)
        if self.buffer.device.type != "cpu":
            # The buffer holds pinned host copies: the module's own weights are dropped so that
            # moving the layer to the device moves no expert weights (untested here: no GPU).
            for params in host:
                for t in params.values():
                    t.data = t.data.new_empty(0)

    def forward(
        self, hidden_TD: torch.Tensor, tokens_per_expert_E: torch.Tensor, probs_T: torch.Tensor
    ):
        counts = [int(c) for c in tokens_per_expert_E.tolist()]
        tokens = torch.split(hidden_TD, counts)
        probs = torch.split(probs_T, counts)
        active = [e for e, c in enumerate(counts) if c > 0]
        outputs: dict[int, torch.Tensor] = {}
        for expert in self.buffer.begin_batch(active):
            weights = self.buffer.fetch(expert)
            module = self.inner.local_experts[expert]
            out, _ = functional_call(module, weights, (tokens[expert], probs[expert]))
            outputs[expert] = out
        empty = hidden_TD.new_zeros((0, hidden_TD.shape[-1]))
        parts = [outputs.get(e, empty) for e in range(len(counts))]
        return torch.cat(parts, dim=0), None


def buffer_moe_layer(
    layer: torch.nn.Module, budget: int, device: str | torch.device = "cpu"
) -> BufferedSequentialMLP:
    """Replace ``layer.experts`` (a SequentialMLP) with its buffered twin; returns the twin."""
    buffered = BufferedSequentialMLP(layer.experts, budget, device)
    layer.experts = buffered
    return buffered
