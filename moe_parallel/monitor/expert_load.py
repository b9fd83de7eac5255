"""Dead experts: an expert of a layer that received no token for ``dead_expert_steps``
consecutive training steps (from the step's global token counts, train/moe_stats.py).

An expert is dead from the step that completes its run of empty steps until the first step in
which it receives a token again (then it is reported as revived). Layers are numbered from 0
(global numbering, as in ``moe/tokens_per_expert``); experts from 0 (global expert index).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DeadExpertUpdate:
    dead: dict[int, list[int]]  # layer -> its dead experts now (layers with none left out)
    died: dict[int, list[int]] = field(default_factory=dict)  # became dead this step
    revived: dict[int, list[int]] = field(default_factory=dict)  # got tokens again this step


class DeadExperts:
    def __init__(self, dead_expert_steps: int):
        if dead_expert_steps < 1:
            raise ValueError(f"monitor.dead_expert_steps must be >= 1, got {dead_expert_steps}")
        self.steps = dead_expert_steps
        self.idle_steps: dict[int, list[int]] = {}  # layer -> consecutive empty steps per expert

    def update(self, tokens_per_expert: dict[int, list[float]]) -> DeadExpertUpdate:
        """One step's token counts per layer and expert -> dead experts and what changed."""
        out = DeadExpertUpdate(dead={})
        for layer, counts in tokens_per_expert.items():
            idle = self.idle_steps.setdefault(layer, [0] * len(counts))
            if len(idle) != len(counts):
                raise ValueError(
                    f"layer {layer}: {len(counts)} experts this step, {len(idle)} before"
                )
            was_dead = {e for e, n in enumerate(idle) if n >= self.steps}
            for e, count in enumerate(counts):
                idle[e] = 0 if count > 0 else idle[e] + 1
            dead = {e for e, n in enumerate(idle) if n >= self.steps}
            if dead:
                out.dead[layer] = sorted(dead)
            if dead - was_dead:
                out.died[layer] = sorted(dead - was_dead)
            if was_dead - dead:
                out.revived[layer] = sorted(was_dead - dead)
        return out
