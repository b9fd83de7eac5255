"""``moectl status``: runs and their state, from state.json, the heartbeat, the last metrics
record and, for SLURM and Ray runs, the scheduler's own view of the job. The table's rows are
``moe_parallel.views.summary`` (shared with ``watch`` and ``dashboard``)."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from cluster import RunLayout, read_record
from cluster.watchdog import status_lines
from moe_parallel.views.summary import (
    COLUMNS,
    age_text,
    dead_experts_text,
    refreshed,
    row,
    stragglers_text,
    summarize,
    summarize_all,
)

__all__ = ["last_metrics", "print_run", "print_status", "refreshed"]


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


def print_status(
    root: Path | None, run: Path | None = None, peak_tflops: float | None = None
) -> int:
    """Every run of the registry in one table, whatever its backend (local, SLURM, Ray)."""
    if run is not None:
        return print_run(run, peak_tflops)
    table = Table(*COLUMNS)
    notes = []
    for summary in summarize_all(root, peak_tflops):
        table.add_row(*row(summary))
        notes += [f"{summary.name}: {n}" for n in summary.notes]
    Console(width=220).print(table)
    for note in notes:
        print(f"note: {note}")
    return 0


def print_run(run_dir: Path, peak_tflops: float | None = None) -> int:
    """One run in detail: the table row, then every restart and the failure."""
    s = summarize(run_dir, read_record(run_dir), peak_tflops)
    record = read_record(run_dir)
    print(f"run:       {run_dir}")
    print(f"backend:   {record.backend}   status: {record.status.value}   scheduler: {s.scheduler}")
    print(f"jobs:      {', '.join(record.job_ids) or '-'}")
    print(
        f"step:      {'' if s.step is None else s.step}   "
        f"loss: {'' if s.loss is None else f'{s.loss:.4f}'}   "
        f"tokens/s: {'' if s.tokens_per_s is None else f'{s.tokens_per_s:.0f}'}   "
        f"MFU: {s.mfu_text}   heartbeat: {age_text(s.heartbeat_age_s)}"
    )
    if s.stragglers is not None:
        print(f"stragglers: {stragglers_text(s.stragglers)}")
    if s.dead_experts is not None:
        print(f"dead experts: {dead_experts_text(s.dead_experts)}")
    for note in s.notes:
        print(f"note:      {note}")
    for r in record.restarts:
        print(f"restart:   {r.at} attempt {r.attempt} [{r.kind}] at step {r.step}: {r.reason}")
    for r in record.resizes:
        print(
            f"resize:    {r.at} [{r.kind}] at step {r.step}: data-parallel "
            f"{r.from_data_parallel} -> {r.to_data_parallel} ({r.from_world_size} -> "
            f"{r.to_world_size} ranks): {r.cause}"
        )
    for line in status_lines(run_dir, record.hangs, record.world_size, not record.status.terminal):
        print(line)
    if record.failure_reason:
        print(f"reason:    {record.failure_reason}")
    return 0
