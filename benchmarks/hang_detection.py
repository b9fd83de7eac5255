"""Hang detection on the local backend: a rank hung inside a collective, to its detection and to
the restarted run's first step.

    python benchmarks/hang_detection.py [--hang-timeout S] [key=value ...]

Runs the tiny config (2 ranks) with ``MOE_PARALLEL_FAULT=hang:rank=1:step=5:times=1``
(checkpoint every 4 steps) and prints:
  hang_to_detection_s     rank 1 blocked inside a collective -> the watchdog's hang record
                          (monitor.hang_timeout plus the heartbeat interval and the poll)
  detection_to_restart_s  stack dumps written, hang recorded, ranks stopped, ranks started again
  restart_to_step_s       Python, Megatron, checkpoint load, the first step after the resume
  hang_to_resumed_step_s  the headline: hang -> first finished step of the restarted run
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cluster.registry import read_record  # noqa: E402
from moe_parallel.launch_run import launch_local, plan_train  # noqa: E402

HANG_STEP = 5


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hang-timeout", type=float, default=20.0)
    parser.add_argument("--heartbeat-interval", type=float, default=1.0)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    runs = Path(tempfile.mkdtemp(prefix="hang-bench-"))
    overrides = [
        "train.steps=8",
        "train.warmup_steps=2",
        "checkpoint.interval=4",
        "log.tensorboard=false",
        f"monitor.hang_timeout={args.hang_timeout}",
        f"monitor.heartbeat_interval={args.heartbeat_interval}",
        *args.overrides,
    ]
    launch = plan_train(REPO / "configs/tiny/moe_tiny.yaml", overrides, str(runs), None, None)
    first_resumed_step: list[float] = []
    watcher = threading.Thread(
        target=_watch_step, args=(launch.run_dir, first_resumed_step), daemon=True
    )
    watcher.start()
    code = launch_local(
        launch, stream=False, env={"MOE_PARALLEL_FAULT": f"hang:rank=1:step={HANG_STEP}:times=1"}
    )
    if code != 0:
        raise SystemExit(f"the run failed (exit {code}); see {launch.run_dir}/state.json")
    record = read_record(launch.run_dir)
    if len(record.hangs) != 1 or not first_resumed_step:
        raise SystemExit(f"expected one hang and a resumed step; see {launch.run_dir}")
    log = (launch.run_dir / "logs" / "rank1.log").read_text()
    hung = float(re.search(r"hanging inside \w+ since ([\d.]+)", log).group(1))
    detected = datetime.fromisoformat(record.hangs[0].at).timestamp()
    restarted = datetime.fromisoformat(record.restarts[0].at).timestamp()
    print(f"run_dir={launch.run_dir}")
    print(f"hang_timeout_s={args.hang_timeout:.1f}")
    print(f"heartbeat_interval_s={args.heartbeat_interval:.1f}")
    print(f"hang_to_detection_s={detected - hung:.1f}")
    print(f"detection_to_restart_s={restarted - detected:.1f}")
    print(f"restart_to_step_s={first_resumed_step[0] - restarted:.1f}")
    print(f"hang_to_resumed_step_s={first_resumed_step[0] - hung:.1f}")
    return 0


def _watch_step(run_dir: Path, out: list[float]) -> None:
    """When rank 0's run heartbeat first shows step HANG_STEP (only the restarted run gets
    there: the first attempt hangs inside it)."""
    path = run_dir / "heartbeat.json"
    while True:
        try:
            beat = json.loads(path.read_text())
        except FileNotFoundError:
            beat = None
        if beat and beat["step"] >= HANG_STEP:
            out.append(beat["time"])
            return
        time.sleep(0.1)


if __name__ == "__main__":
    sys.exit(main())
