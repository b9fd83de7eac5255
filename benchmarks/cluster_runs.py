"""What the cluster benchmarks share: submitting the tiny run with `moectl submit` and waiting on
the files of its run directory (heartbeat, state, metrics events)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def heartbeat(run_dir: Path) -> dict | None:
    """Rank 0's last finished step and its wall time (heartbeat.json), None before step 1."""
    return read_json(run_dir / "heartbeat.json")


def events(run_dir: Path, name: str) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if r.get("event") == name]


def wait(predicate, timeout: float, what: str):
    """The first true value of ``predicate()`` (polled every 50 ms) within ``timeout`` s."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise TimeoutError(f"no {what} within {timeout} s")


def moectl(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "launch.cli", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )


def submit_tiny(runs: Path, env: dict, args: list[str]) -> Path:
    """`moectl submit configs/tiny/moe_tiny.yaml ARGS --runs RUNS`; returns the run directory."""
    done = moectl(
        "submit",
        "configs/tiny/moe_tiny.yaml",
        "log.tensorboard=false",
        *args,
        "--runs",
        str(runs),
        env=env,
    )
    return Path(done.stdout.split("run directory: ", 1)[1].splitlines()[0])
