"""The one entry every backend runs on every rank: ``python -m moe_parallel.train.entry RUN_DIR``.

It reads RUN_DIR/config.yaml, joins the job's process group, builds data and model, resumes
from the newest checkpoint when there is one, trains, and checkpoints. It knows nothing about
which backend started it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from cluster.env import EXIT_REQUEUE
from moe_parallel.runtime import cpu_adapter as device_adapter
from ..config import load_config, resolve_device
from moe_parallel.runtime.quiet import quiet_expected_warnings


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m moe_parallel.train.entry RUN_DIR", file=sys.stderr)
        return 2
    run_dir = Path(argv[0])
    quiet_expected_warnings()
    cfg = load_config(run_dir / "config.yaml")
    device = resolve_device(cfg, torch.cuda.is_available() and cfg.train.device != "cpu")
    if device == "cpu":
        os.environ["MOE_PARALLEL_DEVICE"] = "cpu"
        device_adapter.activate()
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from moe_parallel.runtime.distributed import _env, init_distributed, shutdown_distributed  # megatron: after filters
    from .loop import train

    monitor = None
    if cfg.monitor.enabled:  # heartbeats, collective tracing, stack dumps on the watchdog's signal
        from ..monitor.heartbeat import start_rank_monitor

        monitor = start_rank_monitor(run_dir, int(_env("RANK")), cfg.monitor.heartbeat_interval,
                                     device)
    info = init_distributed(cfg, device)
    try:
        result = train(cfg, run_dir, info)
    finally:
        shutdown_distributed()
    if monitor is not None:
        monitor.stop()
    # A run stopped by a signal saved a checkpoint: tell the backend it may requeue it.
    return EXIT_REQUEUE if result.stopped_by is not None else 0


if __name__ == "__main__":
    sys.exit(main())
