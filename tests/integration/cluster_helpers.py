"""Helpers shared by the cluster backends' integration tests (SLURM, Ray)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil

from tests.conftest import REPO


def moectl(
    *args: str, env: dict | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "launch.cli", *args],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def state(run_dir: Path) -> dict:
    return json.loads((run_dir / "state.json").read_text())


def losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "event" not in record:
            out[record["step"]] = record["loss"]
    return out


def events(run_dir: Path, name: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("event") == name]


def events_of(run_dir: Path, name: str) -> list[dict]:
    """Like :func:`events`, and empty while the run has no metrics file yet."""
    return events(run_dir, name) if (run_dir / "metrics.jsonl").is_file() else []


def step_losses(run_dir: Path) -> list[tuple[int, float]]:
    """Every step record, in order (a step recomputed after a restart appears twice)."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines) if "event" not in r]


def wait_for(predicate, timeout: float, what: str, poll: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def heartbeat_step(run_dir: Path) -> int:
    path = run_dir / "heartbeat.json"
    return json.loads(path.read_text())["step"] if path.is_file() else 0


def run_processes(run_dir: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if any(str(run_dir) in part for part in proc.info["cmdline"] or []):
            found.append(proc)
    return found


def assert_no_process_left(run_dir: Path, timeout: float = 30) -> None:
    """Every process of the run is gone within ``timeout`` s; names the ones that are not."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = run_processes(run_dir)
        if not left:
            return
        time.sleep(0.5)
    described = []
    for proc in left:
        try:
            described.append(
                f"pid {proc.pid} ppid {proc.ppid()} {proc.status()}: "
                f"{' '.join(proc.cmdline())[:200]}"
            )
        except psutil.NoSuchProcess:
            continue
    assert not described, "processes of the run still alive:\n" + "\n".join(described)


def injected_hang(run_dir: Path) -> str:
    """The collective the hang fault blocked in, as the hung rank printed it in its log (the
    ``hanging inside NAME since T`` line of runtime.faults), wherever the backend put the logs."""
    pattern = re.compile(r"\[fault injection\] hanging inside (\w+) since ")
    names = {
        match.group(1)
        for log in run_dir.rglob("*.log")
        for match in pattern.finditer(log.read_text(errors="replace"))
    }
    assert len(names) == 1, f"expected one injected hang in {run_dir}'s logs, found {names}"
    return names.pop()


def assert_shrunk_and_grown_back(run_dir: Path, reference: dict[int, float]) -> tuple[dict, dict]:
    """What every backend's elastic test checks: the run completed after one shrink from DP2 to
    DP1 and one grow back to DP2, both in state.json and as the resumed run's events, the ranks
    stopped for the grow-back at a checkpoint, and every step's loss, those run twice included,
    equals the uninterrupted DP2 run's (``reference``). Returns state.json's two resizes."""
    from tests.conftest import rel_diff

    s = state(run_dir)
    assert s["status"] == "completed", s
    shrink, grow = s["resizes"]
    assert (shrink["kind"], shrink["from_data_parallel"], shrink["to_data_parallel"]) == (
        "elastic_shrink",
        2,
        1,
    )
    assert (grow["kind"], grow["to_data_parallel"], grow["to_world_size"]) == ("elastic_grow", 2, 2)
    [shrunk] = events(run_dir, "elastic_shrink")
    [grown] = events(run_dir, "elastic_grow")
    assert shrunk["step"] in (4, 8) and (shrunk["from"]["data"], shrunk["to"]["data"]) == (2, 1)
    assert grown["step"] in (8, 12) and grown["step"] > shrunk["step"]
    assert events_of(run_dir, "stopped")[-1]["signal"] == "grow_back"
    seen = step_losses(run_dir)
    assert sorted({step for step, _ in seen}) == list(range(1, 17))
    for step, loss in seen:
        assert rel_diff(loss, reference[step]) < 1e-4, (step, loss, reference[step])
    return shrink, grow
