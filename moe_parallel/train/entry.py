"""The one entry every backend runs on every rank: ``python -m moe_parallel.train.entry RUN_DIR``.

It reads RUN_DIR/config.yaml, joins the job's process group, builds data and model, resumes
from the newest checkpoint when there is one, trains, and checkpoints. It knows nothing about
which backend started it.
"""

from __future__ import annotations

import sys
from pathlib import Path

from cluster.env import EXIT_REQUEUE, rank_var
from moe_parallel.config import load_config
from moe_parallel.config.recovery import attempt_config
from moe_parallel.runtime.bootstrap import start_rank, stop_rank


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m moe_parallel.train.entry RUN_DIR", file=sys.stderr)
        return 2
    run_dir = Path(argv[0])
    # An elastic run's attempt may have fewer data-parallel replicas (config/recovery.py).
    cfg = attempt_config(load_config(run_dir / "config.yaml"))
    monitors = []

    def start_monitor(device: str) -> None:
        # Heartbeats, collective tracing, stack dumps on the watchdog's signal: from before the
        # rendezvous, so that a rank stuck in it is seen.
        from moe_parallel.monitor.heartbeat import start_rank_monitor

        monitors.append(
            start_rank_monitor(run_dir, rank_var("RANK"), cfg.monitor.heartbeat_interval, device)
        )

    info = start_rank(cfg, before_process_group=start_monitor if cfg.monitor.enabled else None)
    from .trainer import train  # Megatron: after the process is prepared

    try:
        result = train(cfg, run_dir, info)
    finally:
        stop_rank()
    for monitor in monitors:
        monitor.stop()
    # A run stopped by a signal saved a checkpoint: tell the backend it may requeue it.
    return EXIT_REQUEUE if result.stopped_by is not None else 0


if __name__ == "__main__":
    sys.exit(main())
