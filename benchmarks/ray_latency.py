"""Latencies of the Ray backend on the local Ray cluster (head + a worker node; started if needed).

    python benchmarks/ray_latency.py [--record] [key=value ...]

Prints, for the tiny run (2 ranks, one per node):
  submit_to_first_step_s     `moectl submit --backend ray` called -> step 1 finished
  kill_to_resumed_step_s     rank 1's actor process SIGKILLed -> first step after the restart
--record writes them to benchmarks/results/recovery_costs.json (the goodput simulator's input).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.cluster_runs import heartbeat, moectl, submit_tiny, wait  # noqa: E402
from benchmarks.measured_costs import record_figures  # noqa: E402
from cluster.testbed import ray as ray_local  # noqa: E402


def rank_actor(run_dir: Path, rank: int) -> psutil.Process:
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if (
            "moe_parallel.train.entry" in cmd
            and str(run_dir) in cmd
            and proc.environ().get("RANK") == str(rank)
        ):
            return proc.parent()
    raise LookupError(f"rank {rank} of {run_dir} not found")


def main() -> int:
    record = "--record" in sys.argv
    overrides = [arg for arg in sys.argv[1:] if arg != "--record"]
    info = ray_local.start()
    env = {**os.environ, **info.env()}
    runs = Path(tempfile.mkdtemp(prefix="ray-bench-"))
    started = time.time()
    run_dir = submit_tiny(
        runs,
        env,
        [
            "train.steps=200",
            "checkpoint.interval=5",
            *overrides,
            "--backend",
            "ray",
            "--address",
            "http://127.0.0.1:8265",
            "ray.strategy=STRICT_SPREAD",
        ],
    )
    first = wait(lambda: heartbeat(run_dir), 600, "first step")
    wait(lambda: (heartbeat(run_dir) or {}).get("step", 0) >= 7, 600, "step 7")
    killed_at = time.time()
    os.kill(rank_actor(run_dir, 1).pid, signal.SIGKILL)

    def resumed():
        state = json.loads((run_dir / "state.json").read_text())
        beat = heartbeat(run_dir)
        if not state["restarts"] or beat is None:
            return None
        restarted_at = datetime.fromisoformat(state["restarts"][0]["at"]).timestamp()
        return beat if beat["time"] > restarted_at else None  # a step of the new attempt

    after = wait(resumed, 600, "a step after the restart")
    moectl("cancel", str(run_dir), env=env)
    figures = {
        "submit_to_first_step_s": round(first["time"] - started, 1),
        "kill_to_resumed_step_s": round(after["time"] - killed_at, 1),
    }
    if record:  # the goodput simulator's restart cost (benchmarks/results/)
        record_figures("ray_latency", figures)
    for name, value in figures.items():
        print(f"{name}={value:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
