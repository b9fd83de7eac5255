"""``moectl status``: runs and their state, from state.json, the heartbeat, the last metrics
record and, for SLURM runs, SLURM's own view of the job."""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from cluster import RunLayout, RunRecord, list_runs, read_record
from cluster.registry import read_heartbeat


def last_metrics(run_dir: Path) -> dict:
    path = RunLayout(run_dir).metrics
    if not path.is_file():
        return {}
    last = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                if "event" not in record:
                    last = record
    return last


def refreshed(run_dir: Path, record: RunRecord) -> tuple[RunRecord, str]:
    """The record (corrected by the backend when it knows better) and the scheduler's state."""
    if record.backend not in ("slurm", "ray") or not record.job_ids:
        return record, ""
    from cluster.backend import BackendError

    try:
        if record.backend == "slurm":
            from cluster.slurm import SlurmBackend, job_state

            record = SlurmBackend().refresh(run_dir)
            return record, job_state(record.job_ids[-1])
        from cluster.ray_backend import backend_for_run

        backend = backend_for_run(run_dir)
        record = backend.refresh(run_dir)
        return record, backend.job_status(record.job_ids[-1])
    except (BackendError, FileNotFoundError, OSError) as exc:
        if record.status.terminal:  # the scheduler may have forgotten an old job: nothing to say
            return record, ""
        return record, f"? ({str(exc).splitlines()[0][:80]})"


def _age(seconds: float | None) -> str:
    if seconds is None:
        return ""
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


def _row(path: Path, record: RunRecord) -> list[str]:
    record, scheduler = refreshed(path, record)
    m, beat = last_metrics(path), read_heartbeat(path)
    step = beat["step"] if beat else m.get("step", "")
    detail = (record.failure_reason or "").splitlines()[0] if record.failure_reason else ""
    if not detail and record.restarts:
        last = record.restarts[-1]
        detail = f"{len(record.restarts)} restart(s); last: {last.kind}: {last.reason}"
    return [path.name, record.backend, record.status.value, scheduler, ",".join(record.job_ids[-1:]),
            str(step), f"{m['loss']:.4f}" if "loss" in m else "",
            f"{m['tokens_per_s']:.0f}" if "tokens_per_s" in m else "",
            _age(time.time() - beat["time"]) if beat else "", detail]


def print_status(root: Path | None, run: Path | None = None) -> int:
    if run is not None:
        return print_run(run)
    table = Table("run", "backend", "status", "scheduler", "job", "step", "loss", "tokens/s",
                  "heartbeat", "detail")
    for entry in list_runs(root):
        if entry.record is None:
            table.add_row(entry.path.name, "?", "unreadable", "", "", "", "", "", "", str(entry.error))
            continue
        table.add_row(*_row(entry.path, entry.record))
    Console(width=200).print(table)
    return 0


def print_run(run_dir: Path) -> int:
    """One run in detail: the table row, then every restart and the failure."""
    record = read_record(run_dir)
    row = _row(run_dir, record)
    record = read_record(run_dir)
    print(f"run:       {run_dir}")
    print(f"backend:   {record.backend}   status: {record.status.value}   scheduler: {row[3]}")
    print(f"jobs:      {', '.join(record.job_ids) or '-'}")
    print(f"step:      {row[5]}   loss: {row[6]}   tokens/s: {row[7]}   heartbeat: {row[8]}")
    for r in record.restarts:
        print(f"restart:   {r.at} attempt {r.attempt} [{r.kind}] at step {r.step}: {r.reason}")
    from moe_parallel.monitor.watchdog import status_lines  # per-rank heartbeats, hang records

    for line in status_lines(run_dir, record.hangs, record.world_size, not record.status.terminal):
        print(line)
    if record.failure_reason:
        print(f"reason:    {record.failure_reason}")
    return 0
