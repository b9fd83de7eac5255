"""Monitoring overhead benchmark: the training loop's step with monitoring on and off, same run.

Both kinds of step are the Trainer's ``train_step`` on the same model, optimizer and batches;
they alternate step by step so that drift (warm-up, caches, other load on the machine) hits both
alike; the median step time of each is taken (the first pairs are warm-up), and the median of the
on/off ratios of adjacent pairs is printed too. "On" is what ``monitor.enabled`` adds to a
step: collective tracing (torch.distributed's and Megatron's bound collectives wrapped), the
per-rank times (riding along the expert-load all_reduce) and the straggler decision, router
entropy and dead-expert tracking. "Off" uninstalls the tracing and unwraps the routers.
Also printed: CPU seconds per step summed over the ranks, on and off (``cpu_ratio``), which the
scheduling noise of a shared host does not reach. Not included: the heartbeat thread (one
small file write every ``monitor.heartbeat_interval`` seconds, off the training thread).
Every rank times each step between two barriers, so the figures are the slowest rank's.
Printed last: ``monitoring_overhead_ratio=<on median / off median>``.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from moe_parallel.bench.common import run_rank, step_at

if TYPE_CHECKING:
    from moe_parallel.train.trainer import Trainer


def measure(trainer: Trainer, run_dir: Path, repeats: int) -> None:
    from moe_parallel.monitor import collectives

    cfg, monitor, moe = trainer.cfg, trainer.step_monitor, trainer.expert_load

    def switch(on: bool) -> None:
        if on:
            collectives.install()
        else:
            collectives.uninstall()
        trainer.step_monitor = monitor if on else None
        if moe is not None:
            moe.watch_router_entropy(on)
            moe.ride_along = monitor.stragglers.own_times if on else None

    times = {"off": [], "on": []}  # wall seconds per step
    cpu = {"off": [], "on": []}  # CPU seconds per step, summed over the ranks
    step = 0
    for pair in range(repeats):
        order = ("off", "on") if pair % 2 == 0 else ("on", "off")
        for name in order:
            switch(name == "on")
            torch.distributed.barrier()
            started, cpu_started = time.perf_counter(), time.process_time()
            step_at(trainer, step)
            cpu_s = torch.tensor([time.process_time() - cpu_started], dtype=torch.float64)
            torch.distributed.all_reduce(cpu_s)  # also the closing barrier
            times[name].append(time.perf_counter() - started)
            cpu[name].append(float(cpu_s))
            step += 1
    switch(True)
    trainer.metrics.close()
    if trainer.info.is_logger:
        _report(cfg, times, cpu, warmup=2)


def _report(cfg, times: dict, cpu: dict, warmup: int) -> None:
    median = {k: statistics.median(v[warmup:]) for k, v in times.items()}
    cpu_median = {k: statistics.median(v[warmup:]) for k, v in cpu.items()}
    tokens = cfg.train.global_batch_size * cfg.model.seq_length
    print(f"ranks={cfg.world_size} layout={cfg.parallel.model_dump(exclude_none=True)}")
    for k in ("off", "on"):
        print(
            f"monitoring_{k}_step_s={median[k]:.4f} {k}_tokens_per_s={tokens / median[k]:.0f} "
            f"{k}_step_s_min={min(times[k][warmup:]):.4f} "
            f"{k}_cpu_s_per_step={cpu_median[k]:.4f}"
        )
    pairs = [b / a for a, b in zip(times["off"][warmup:], times["on"][warmup:])]
    print(
        f"samples_per_kind={len(times['off']) - warmup} "
        f"median_pair_ratio={statistics.median(pairs):.4f} "
        f"cpu_ratio={cpu_median['on'] / cpu_median['off']:.4f}"
    )
    print(f"monitoring_overhead_ratio={median['on'] / median['off']:.4f}", flush=True)


if __name__ == "__main__":
    run_rank(measure, overrides=["monitor.enabled=true"])
