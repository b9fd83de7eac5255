"""Elastic recovery on the local Ray cluster (head + a worker node; started if needed).

    python benchmarks/elastic_recovery.py [--repeats N] [key=value ...]

A tiny run of two ranks, one per node (STRICT_SPREAD, data-parallel 2, `recovery.mode: elastic`,
`recovery.wait_for_capacity_s: 0`, a checkpoint every 5 steps) loses its worker node as on a
machine failure (every process of the node SIGKILLed) after step 7, goes on with one replica on
the head, and grows back when the node is started again. Per repeat it prints the two spans,
each broken into its parts:

  node loss -> first step on the shrunk layout (node_loss_to_step_s)
    detect_s    the node's processes killed -> the driver records the failure (state.json restart)
    replan_s    -> the shrunk size decided and recorded (state.json resize)
    restart_s   -> the ranks started, imported Megatron, joined, built the model
    load_s      the checkpoint load with its reshard (the resume event)
    step_s      -> the first step finished (the resume-loss check and one step)
  capacity back -> first step at full size (grow_to_step_s)
    wait_s      the node started again -> the ranks stop at their next checkpoint (the stop event)
    restart and load as above, then the first step

The last line is `node_loss_to_step_s=` (the median over the repeats).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.cluster_runs import events, moectl, read_json, submit_tiny, wait  # noqa: E402
from cluster.testbed import ray as ray_local  # noqa: E402

CHECKPOINT_INTERVAL = 5


def at(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def submit(runs: Path, env: dict, overrides: list[str]) -> Path:
    return submit_tiny(
        runs,
        env,
        [
            "train.steps=400",
            f"checkpoint.interval={CHECKPOINT_INTERVAL}",
            "parallel.expert=1",
            "recovery.mode=elastic",
            "recovery.wait_for_capacity_s=0",
            *overrides,
            "--backend",
            "ray",
            "--address",
            "http://127.0.0.1:8265",
            "ray.strategy=STRICT_SPREAD",
        ],
    )


def first_step_after(run_dir: Path, since: float) -> float:
    """Wall time of the first heartbeat (a finished step) written after ``since``."""

    def beat():
        found = read_json(run_dir / "heartbeat.json")
        return found["time"] if found and found["time"] > since else None

    return wait(beat, 600, "a step after the restart")


def shrink(run_dir: Path) -> dict:
    wait(lambda: (read_json(run_dir / "heartbeat.json") or {}).get("step", 0) >= 7, 600, "step 7")
    killed = time.time()
    ray_local.stop_worker_node()
    state = wait(lambda: (read_json(run_dir / "state.json") or {}).get("resizes"), 600, "shrink")
    state = read_json(run_dir / "state.json")
    event = wait(lambda: events(run_dir, "elastic_shrink"), 600, "the shrink event")[-1]
    step_at = first_step_after(run_dir, event["time"])
    resume = events(run_dir, "resume")[-1]
    restart_at, resize_at = at(state["restarts"][-1]["at"]), at(state["resizes"][-1]["at"])
    return {
        "detect_s": restart_at - killed,
        "replan_s": resize_at - restart_at,
        "restart_s": event["time"] - resume["load_s"] - resize_at,
        "load_s": resume["load_s"],
        "step_s": step_at - event["time"],
        "node_loss_to_step_s": step_at - killed,
    }


def grow(run_dir: Path) -> dict:
    started = time.time()
    ray_local.start_worker_node()
    back = time.time()
    stop = wait(
        lambda: [e for e in events(run_dir, "stopped") if e["signal"] == "grow_back"],
        600,
        "the grow-back stop",
    )[-1]
    event = wait(lambda: events(run_dir, "elastic_grow"), 600, "the grow event")[-1]
    stopped_at = at(read_json(run_dir / "state.json")["restarts"][-1]["at"])
    step_at = first_step_after(run_dir, event["time"])
    resume = events(run_dir, "resume")[-1]
    return {
        "node_start_s": back - started,
        "wait_s": stopped_at - back,
        "stop_step": stop["step"],
        "restart_s": event["time"] - resume["load_s"] - stopped_at,
        "load_s": resume["load_s"],
        "step_s": step_at - event["time"],
        "grow_to_step_s": step_at - back,
    }


def one_repeat(runs: Path, env: dict, overrides: list[str]) -> tuple[dict, dict]:
    run_dir = submit(runs, env, overrides)
    try:
        lost = shrink(run_dir)
        back = grow(run_dir)
    finally:
        ray_local.start_worker_node()
        moectl("cancel", str(run_dir), env=env)
    return lost, back


def figures(values: dict) -> str:
    return " ".join(f"{k}={v}" if isinstance(v, int) else f"{k}={v:.1f}" for k, v in values.items())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args, overrides = parser.parse_known_args()
    info = ray_local.start()
    env = {**os.environ, **info.env()}
    runs = Path(tempfile.mkdtemp(prefix="elastic-bench-"))
    totals = []
    for repeat in range(args.repeats):
        lost, back = one_repeat(runs, env, overrides)
        print(f"repeat {repeat}: node loss: {figures(lost)}")
        print(f"repeat {repeat}: grow back: {figures(back)}")
        totals.append(lost["node_loss_to_step_s"])
    spread = f"{min(totals):.1f}..{max(totals):.1f}"
    print(f"node_loss_to_step_s over {len(totals)} repeats: median, range {spread}")
    print(f"node_loss_to_step_s={statistics.median(totals):.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
