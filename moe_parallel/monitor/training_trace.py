"""``log.routing_trace: true``: every rank records the routing of all its training forwards
(held-out evaluation included) and writes ``RUN_DIR/routing/rank{R}.npz`` (monitor/routing_trace.py format)
when training ends. Each rank routes its own micro-batches, so the ranks' files together are the
run's routing; ``meta.forwards`` lists the tokens of each recorded forward in order."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from moe_parallel.monitor.routing_recorder import RoutingRecorder
from moe_parallel.monitor.routing_trace import save_trace


@contextlib.contextmanager
def training_trace(cfg, run_dir: Path, rank: int, chunks: list[torch.nn.Module]):
    if not cfg.log.routing_trace or cfg.model.moe is None:
        yield None
        return
    with RoutingRecorder(torch.nn.ModuleList(chunks)) as recorder:
        try:
            yield recorder
        finally:
            save_trace(
                run_dir / "routing" / f"rank{rank}.npz",
                recorder.experts(),
                {
                    "source": "training",
                    "run": str(run_dir),
                    "rank": rank,
                    "num_experts": cfg.model.moe.num_experts,
                    "top_k": cfg.model.moe.top_k,
                    "forwards": recorder.forward_tokens,
                    "dropped_per_layer": recorder.dropped_per_layer(),
                },
                recorder.probs(),
            )
