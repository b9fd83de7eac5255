"""Latencies of the SLURM backend on the local SLURM (started if needed, two simulated hosts).

    python benchmarks/slurm_latency.py [--nodes N] [--record] [key=value ...]

Prints, for the tiny run:
  submit_to_first_step_s     `moectl submit` called -> step 1 finished
  signal_to_resumed_step_s   SIGUSR2 sent (as before a time limit) -> first step after resume,
  split into signal_to_stopped_s (checkpoint + exit), stopped_to_restart_s (teardown, requeue,
  SLURM's requeue wait: AuthInfo=cred_expire, 10 s on the local cluster, 120 s by default) and
  restart_to_step_s (Python, Megatron, checkpoint load, first step).
--record writes them to benchmarks/results/recovery_costs.json (the goodput simulator's input).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.cluster_runs import heartbeat, moectl, submit_tiny, wait  # noqa: E402
from benchmarks.measured_costs import record_figures  # noqa: E402
from cluster.testbed import slurm as slurm_local  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument(
        "--record", action="store_true", help="write the figures to benchmarks/results/"
    )
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    slurm_local.start(hosts=2)
    runs = Path(tempfile.mkdtemp(prefix="slurm-bench-"))
    started = time.time()
    env = dict(os.environ)
    run_dir = submit_tiny(
        runs,
        env,
        [
            "train.steps=200",
            "checkpoint.interval=null",
            *args.overrides,
            "--cluster",
            "configs/clusters/local_slurm.yaml",
            "--nodes",
            str(args.nodes),
        ],
    )
    first = wait(lambda: heartbeat(run_dir), 600, "first step")
    submit_to_step = first["time"] - started
    wait(lambda: (heartbeat(run_dir) or {}).get("step", 0) >= 5, 600, "step 5")
    state = json.loads((run_dir / "state.json").read_text())
    signalled = time.time()
    subprocess.run(["scancel", "--signal=USR2", state["job_ids"][-1]], check=True)
    stopped_step = wait(lambda: _stopped(run_dir), 600, "stop after the signal")
    resumed = wait(lambda: _after(run_dir, stopped_step), 900, "a step after the resume")
    restart_at = _restart_started(run_dir)
    moectl("cancel", str(run_dir), env=env)
    stopped_at = _stop_time(run_dir)
    figures = {
        "nodes": args.nodes,
        "submit_to_first_step_s": submit_to_step,
        "signal_to_stopped_s": stopped_at - signalled,
        "stopped_to_restart_s": restart_at - stopped_at,
        "restart_to_step_s": resumed["time"] - restart_at,
    }
    if args.record:  # the goodput simulator's restart cost (benchmarks/results/)
        record_figures("slurm_latency", {k: round(v, 1) for k, v in figures.items()})
    for name, value in figures.items():
        print(f"{name}={value:.1f}" if isinstance(value, float) else f"{name}={value}")
    print(f"signal_to_resumed_step_s={resumed['time'] - signalled:.1f}")
    return 0


def _stopped(run_dir: Path) -> int | None:
    path = run_dir / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.is_file() else []:
        record = json.loads(line)
        if record.get("event") == "stopped":
            return record["step"]
    return None


def _after(run_dir: Path, step: int) -> dict | None:
    state = json.loads((run_dir / "state.json").read_text())
    beat = heartbeat(run_dir)
    if state["restarts"] and beat and beat["step"] > step:
        return beat
    return None


def _restart_started(run_dir: Path) -> float:
    """When the requeued job's rank 0 started (its log header)."""
    headers = [
        line
        for line in (run_dir / "logs" / "rank0.log").read_text().splitlines()
        if line.startswith("==== SLURM job")
    ]
    return datetime.fromisoformat(headers[-1].split(" at ")[1].rstrip(" =")).timestamp()


def _stop_time(run_dir: Path) -> float:
    """When the requeue was recorded by the teardown (the ranks had saved and exited)."""
    state = json.loads((run_dir / "state.json").read_text())
    return datetime.fromisoformat(state["restarts"][0]["at"]).timestamp()


if __name__ == "__main__":
    sys.exit(main())
