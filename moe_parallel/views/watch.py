"""``moectl watch RUN``: a live terminal view of one run, redrawn every second (rich Live).

The top says what the run is doing (state, step, loss, LR, tokens/s, MFU, restarts, heartbeat
age, stragglers, dead experts); below, per node and rank, each rank's last heartbeat
(``heartbeats/rank{R}.json``): its age, the rank's step, its phase and for how long, the
collective it is inside and for how long, and its memory (RSS; allocated CUDA memory on GPU
ranks). The view ends by itself once the run
reaches a terminal state (completed, failed, cancelled), after drawing that last frame.
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from cluster import read_record
from cluster.state import RunState
from moe_parallel.views.summary import (
    RunSummary,
    age_text,
    bytes_text,
    dead_experts_text,
    stragglers_text,
    summarize,
)

WIDTH = 160


def frame(run_dir: Path, peak_tflops: float | None = None) -> tuple[Group, RunSummary]:
    summary = summarize(run_dir, read_record(run_dir), peak_tflops)
    return render(summary), summary


def render(s: RunSummary) -> Group:
    def num(value, fmt):
        return "-" if value is None else format(value, fmt)

    head = Table.grid(padding=(0, 2))
    head.add_row(
        Text(s.name, style="bold"),
        f"backend {s.backend}",
        Text(f"state {s.status}", style=_state_style(s.status)),
        f"scheduler {s.scheduler or '-'}",
        f"job {s.job or '-'}",
    )
    head.add_row(
        f"step {'-' if s.step is None else s.step}",
        f"loss {num(s.loss, '.4f')}",
        f"lr {num(s.lr, '.3e')}",
        f"tokens/s {num(s.tokens_per_s, '.0f')}",
        f"MFU {s.mfu_text}",
    )
    head.add_row(
        f"restarts {s.restarts}",
        f"heartbeat {age_text(s.heartbeat_age_s) or '-'}",
        f"stragglers {stragglers_text(s.stragglers) or '-'}",
        f"dead experts {dead_experts_text(s.dead_experts) or '-'}",
        f"ranks {s.ranks_text or '-'}",
    )
    parts = [head]
    if s.detail:
        parts.append(Text(s.detail, style="yellow"))
    parts += [Text(f"note: {n}", style="dim") for n in s.notes]
    parts.append(_ranks_table(s))
    return Group(*parts)


def _ranks_table(s: RunSummary) -> Table | Text:
    if not s.ranks:
        return Text(
            "no per-rank heartbeats (heartbeats/rank*.json): the run has not started its "
            "ranks yet, runs with monitor.enabled=false, or predates them",
            style="dim",
        )
    table = Table(
        "node",
        "rank",
        "heartbeat",
        "step",
        "phase",
        "collective",
        "memory (RSS)",
        "CUDA allocated",
        title="ranks",
        title_justify="left",
    )
    previous = None
    for r in sorted(s.ranks, key=lambda r: (r.host or "", r.rank)):
        node = r.host or "?"
        table.add_row(
            node if node != previous else "",
            str(r.rank),
            age_text(r.age_s),
            "-" if r.step is None else str(r.step),
            (r.phase or "-") + (f" ({r.phase_s:.0f}s)" if r.phase_s is not None else ""),
            f"{r.collective} ({r.collective_s:.1f}s)" if r.collective else "-",
            bytes_text(r.rss_bytes),
            bytes_text(r.cuda_bytes) or "-",
        )
        previous = node
    return table


def _state_style(status: str) -> str:
    return {
        "running": "green",
        "completed": "blue",
        "failed": "bold red",
        "cancelled": "red",
        "requeued": "yellow",
        "pending": "yellow",
    }.get(status, "")


def watch(
    run_dir: Path, once: bool, interval_s: float = 1.0, peak_tflops: float | None = None
) -> int:
    console = Console(width=WIDTH) if once else Console()
    if once:
        console.print(frame(run_dir, peak_tflops)[0])
        return 0
    view, summary = frame(run_dir, peak_tflops)
    with Live(view, console=console, refresh_per_second=4, screen=False) as live:
        while not RunState(summary.status).terminal:
            time.sleep(interval_s)
            view, summary = frame(run_dir, peak_tflops)
            live.update(view)
    return 0
