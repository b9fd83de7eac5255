"""Monitoring overhead benchmark: the training loop's step with monitoring on and off, same run.

Both kinds of step are the real loop's ``_one_step`` on the same model, optimizer and batches;
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

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def _rank_main(run_dir: Path, repeats: int) -> None:
    from moe_parallel.runtime import cpu_adapter as device_adapter
    from moe_parallel.config import load_config
    from moe_parallel.runtime.quiet import quiet_expected_warnings

    quiet_expected_warnings()
    cfg = load_config(run_dir / "config.yaml")
    os.environ["MOE_PARALLEL_DEVICE"] = "cpu"
    device_adapter.activate()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from moe_parallel.ckpt.checkpoint import Progress
    from moe_parallel.data import prepare
    from moe_parallel.runtime.distributed import init_distributed, shutdown_distributed
    from moe_parallel.train.loop import _expert_load, _one_step, _step_batches
    from moe_parallel.train.metrics import MetricsWriter
    from moe_parallel.model.build import build_train_objects
    from moe_parallel.monitor import collectives
    from moe_parallel.monitor.step_monitor import StepMonitor

    info = init_distributed(cfg, "cpu")
    prepared = prepare(cfg.data)
    objs = build_train_objects(cfg, prepared.vocab_size,
                               on_cpu=True)
    batches = _step_batches(cfg, prepared, info)
    writer = MetricsWriter(Path(tempfile.mkdtemp()), tensorboard=False, enabled=info.is_logger)
    moe = _expert_load(cfg, objs, info)
    quiet = lambda message: None
    monitor = StepMonitor(cfg, moe, torch.device("cpu"), writer, quiet)

    def switch(on: bool) -> None:
        if on:
            collectives.install()
        else:
            collectives.uninstall()
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
            _one_step(cfg, objs, batches, moe, Progress(step % cfg.train.steps, 0), writer,
                      quiet, monitor if name == "on" else None)
            cpu_s = torch.tensor([time.process_time() - cpu_started], dtype=torch.float64)
            torch.distributed.all_reduce(cpu_s)  # also the closing barrier
            times[name].append(time.perf_counter() - started)
            cpu[name].append(float(cpu_s))
            step += 1
    switch(True)
    writer.close()
    if info.is_logger:
        _report(cfg, times, cpu, warmup=2)
    shutdown_distributed()


def _report(cfg, times: dict, cpu: dict, warmup: int) -> None:
    median = {k: statistics.median(v[warmup:]) for k, v in times.items()}
    cpu_median = {k: statistics.median(v[warmup:]) for k, v in cpu.items()}
    tokens = cfg.train.global_batch_size * cfg.model.seq_length
    print(f"ranks={cfg.world_size} layout={cfg.parallel.model_dump(exclude_none=True)}")
    for k in ("off", "on"):
        print(f"monitoring_{k}_step_s={median[k]:.4f} {k}_tokens_per_s={tokens / median[k]:.0f} "
              f"{k}_step_s_min={min(times[k][warmup:]):.4f} "
              f"{k}_cpu_s_per_step={cpu_median[k]:.4f}")
    pairs = [b / a for a, b in zip(times["off"][warmup:], times["on"][warmup:])]
    print(f"samples_per_kind={len(times['off']) - warmup} "
          f"median_pair_ratio={statistics.median(pairs):.4f} "
          f"cpu_ratio={cpu_median['on'] / cpu_median['off']:.4f}")
    print(f"monitoring_overhead_ratio={median['on'] / median['off']:.4f}", flush=True)


if __name__ == "__main__":
    _rank_main(Path(sys.argv[1]), int(sys.argv[2]))
