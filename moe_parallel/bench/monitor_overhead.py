"""Monitoring overhead benchmark: the training loop's step with monitoring on and off, same run.

Both kinds of step are the Trainer's ``train_step`` on the same model, optimizer and batches;
they alternate in pairs (off-on, on-off, ...) so that drift (warm-up, caches, other load on the
machine) hits both alike; each pair gives a ratio on / off, and the median ratio with its
bootstrap 95% interval is reported, measuring until the interval's half-width is below the goal's
margin (0.01) or the time cap (``common.StopRule``). "On" is what ``monitor.enabled`` adds to a
step: collective tracing (torch.distributed's and Megatron's bound collectives wrapped), the
per-rank times (riding along the expert-load all_reduce) and the straggler decision, router
entropy and dead-expert tracking. "Off" uninstalls the tracing and unwraps the routers.
Also printed: CPU seconds per step summed over the ranks, on and off (``cpu_ratio``), which the
scheduling noise of a shared host does not reach. Not included: the heartbeat thread (one
small file write every ``monitor.heartbeat_interval`` seconds, off the training thread).
Every rank times each step between two barriers, so the figures are the slowest rank's.
Rank arguments: MAX_SECONDS MIN_PAIRS.
Printed last: ``monitoring_overhead_ratio=<median of the on / off pair ratios>`` (goal: <= 1.01).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from moe_parallel.bench.common import (
    PairedTimes,
    StopRule,
    interleaved_pairs,
    report_interval,
    run_rank,
    step_at,
)

if TYPE_CHECKING:
    from moe_parallel.train.trainer import Trainer

GOAL = 1.01


def measure(trainer: Trainer, run_dir: Path, args: list[str]) -> None:
    from moe_parallel.monitor import collectives

    cfg, monitor, moe = trainer.cfg, trainer.step_monitor, trainer.expert_load

    def switch(kind: str) -> None:
        on = kind == "on"
        if on:
            collectives.install()
        else:
            collectives.uninstall()
        trainer.step_monitor = monitor if on else None
        if moe is not None:
            moe.watch_router_entropy(on)
            moe.ride_along = monitor.stragglers.own_times if on else None

    cpu = {"off": [], "on": []}  # CPU seconds per step, summed over the ranks

    def run(kind: str, step: int) -> None:
        cpu_started = time.process_time()
        step_at(trainer, step)
        cpu_s = torch.tensor([time.process_time() - cpu_started], dtype=torch.float64)
        torch.distributed.all_reduce(cpu_s)
        cpu[kind].append(float(cpu_s))

    rule = StopRule(margin=GOAL - 1, max_seconds=float(args[0]), min_pairs=int(args[1]))
    times = interleaved_pairs(run, ("off", "on"), rule, before=switch)
    switch("on")
    trainer.metrics.close()
    if trainer.info.is_logger:
        _report(cfg, times, {k: v[rule.warmup_pairs :] for k, v in cpu.items()})


def _report(cfg, times: PairedTimes, cpu: dict) -> None:
    median = {"off": statistics.median(times.a), "on": statistics.median(times.b)}
    fastest = {"off": min(times.a), "on": min(times.b)}
    cpu_median = {k: statistics.median(v) for k, v in cpu.items()}
    tokens = cfg.train.global_batch_size * cfg.model.seq_length
    print(f"ranks={cfg.world_size} layout={cfg.parallel.model_dump(exclude_none=True)}")
    for k in ("off", "on"):
        print(
            f"monitoring_{k}_step_s={median[k]:.4f} {k}_tokens_per_s={tokens / median[k]:.0f} "
            f"{k}_step_s_min={fastest[k]:.4f} {k}_cpu_s_per_step={cpu_median[k]:.4f}"
        )
    print(
        f"pairs={len(times.a)} ratio_of_medians={median['on'] / median['off']:.4f} "
        f"cpu_ratio={cpu_median['on'] / cpu_median['off']:.4f}"
    )
    report_interval("monitoring_overhead_ratio", times)


if __name__ == "__main__":
    run_rank(measure, overrides=["monitor.enabled=true"])
