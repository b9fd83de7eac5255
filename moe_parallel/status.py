"""``moectl status``: one line per run from its state.json and the last metrics record."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from cluster import RunLayout, list_runs


def last_metrics(run_dir: Path) -> dict:
    path = RunLayout(run_dir).metrics
    if not path.is_file():
        return {}
    last = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                last = json.loads(line)
    return last


def print_status(root: Path | None) -> int:
    table = Table("run", "backend", "status", "step", "loss", "tokens/s", "detail")
    for entry in list_runs(root):
        if entry.record is None:
            table.add_row(entry.path.name, "?", "unreadable", "", "", "", str(entry.error))
            continue
        r, m = entry.record, last_metrics(entry.path)
        table.add_row(
            entry.path.name, r.backend, r.status.value,
            str(m.get("step", "")), f"{m['loss']:.4f}" if "loss" in m else "",
            f"{m['tokens_per_s']:.0f}" if "tokens_per_s" in m else "",
            (r.failure_reason or "").splitlines()[0] if r.failure_reason else "",
        )
    Console().print(table)
    return 0
