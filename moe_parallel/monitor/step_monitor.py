"""What monitoring adds to every training step (``monitor.enabled``): stragglers (per-rank
compute and communication times), router entropy and dead experts, as fields of the step's
metrics record, ``straggler`` / ``dead_experts`` events and log lines when they start and end.

Every rank builds one and calls ``begin_step`` / ``end_step`` around each step (the per-rank
times ride along the step's expert-load all_reduce; without MoE layers ``end_step`` is a
collective: one small all_gather); only the logging rank's writer and printer do anything.
"""

from __future__ import annotations

import torch

from .expert_load import DeadExperts
from .stragglers import StragglerMonitor


class StepMonitor:
    def __init__(self, cfg, expert_load, device: torch.device, writer, say):
        m = cfg.monitor
        self.threshold, self.window = m.straggler_threshold, m.straggler_window
        self.dead_expert_steps = m.dead_expert_steps
        self.stragglers = StragglerMonitor(m.straggler_threshold, m.straggler_window, device)
        self.dead = DeadExperts(m.dead_expert_steps) if expert_load is not None else None
        self.expert_load = expert_load
        if expert_load is not None:
            expert_load.watch_router_entropy(True)
            expert_load.ride_along = self.stragglers.own_times
        self.writer, self.say = writer, say

    def begin_step(self) -> None:
        self.stragglers.begin_step()

    def end_step(self, step: int, loads: dict) -> dict:
        """The step's monitoring fields (for its metrics record); events and log lines now."""
        summed = None
        if self.expert_load is not None:
            summed, self.expert_load.ride_along_sum = self.expert_load.ride_along_sum, None
        record, update = self.stragglers.end_step(summed)
        if update.started:
            started = self.stragglers.describe({r: update.current[r] for r in update.started})
            self.writer.write(
                {"event": "straggler", "state": "start", "step": step, "stragglers": started}
            )
            for s in started:
                self.say(
                    f"STRAGGLER from step {step}: rank {s['rank']} ({s['host']}) computes "
                    f"{s['ratio']:.2f}x the ranks' median (median over the last "
                    f"{self.window} steps; threshold {1 + self.threshold:.2f}x)"
                )
        if update.ended:
            ended = self.stragglers.describe({r: 0.0 for r in update.ended})
            self.writer.write(
                {
                    "event": "straggler",
                    "state": "end",
                    "step": step,
                    "stragglers": [{k: v for k, v in s.items() if k != "ratio"} for s in ended],
                }
            )
            for s in ended:
                self.say(
                    f"straggler ended at step {step}: rank {s['rank']} ({s['host']}) is "
                    f"back within {1 + self.threshold:.2f}x of the ranks' median"
                )
        if self.dead is not None and "tokens_per_expert" in loads:
            record.update(self._dead_experts(step, loads["tokens_per_expert"]))
        return record

    def _dead_experts(self, step: int, tokens_per_expert: dict) -> dict:
        update = self.dead.update(tokens_per_expert)
        if update.died:
            self.writer.write(
                {"event": "dead_experts", "state": "start", "step": step, "experts": update.died}
            )
            for layer, experts in update.died.items():
                self.say(
                    f"DEAD EXPERTS at step {step}: layer {layer} experts {experts} got no "
                    f"token for {self.dead_expert_steps} steps"
                )
        if update.revived:
            self.writer.write(
                {"event": "dead_experts", "state": "end", "step": step, "experts": update.revived}
            )
            for layer, experts in update.revived.items():
                self.say(
                    f"experts revived at step {step}: layer {layer} experts {experts} got "
                    "tokens again"
                )
        return {
            "moe/dead_experts": update.dead,
            "moe/dead_expert_count": {
                layer: len(update.dead.get(layer, ())) for layer in tokens_per_expert
            },
        }
