"""``moectl btx status PLAN_RUN``: the plan's state, then one row per stage and branch."""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from cluster import read_record
from cluster.registry import read_heartbeat
from moe_parallel.views.status import last_metrics, refreshed

from .state import read_state

_ORDER = ("seed", "branch:", "mix", "finetune", "eval")


def print_btx_status(plan_run: Path) -> int:
    state = read_state(plan_run)
    driver = (
        f"alive (pid {state.driver_pid} on {state.driver_host})"
        if state.driver_alive()
        else "not running"
    )
    print(f"plan run: {plan_run}")
    print(f"status:   {state.status}   backend: {state.backend}   driver: {driver}")
    if state.status == "running" and not state.driver_alive():
        print(f"          the driver died: continue with `moectl btx resume {plan_run}`")
    if state.message:
        print(f"message:  {state.message}")
    table = Table(
        "stage", "state", "run", "run status", "step", "loss", "heartbeat", "attempts", "detail"
    )
    for name, stage in sorted(state.stages.items(), key=lambda kv: _rank(kv[0])):
        table.add_row(
            name,
            stage.state,
            *_run_columns(stage.run_dir),
            str(stage.attempts),
            stage.message or "",
        )
    Console(width=200).print(table)
    report = plan_run / "btx_report.json"
    if report.is_file():
        t = json.loads(report.read_text())["timing"]
        print(
            f"report:   {report} (plan wall {t['plan_wall_s']} s, branch parallelism "
            f"{t['branch_parallelism']}x)"
        )
    return 0


def _run_columns(run_dir: str | None) -> list[str]:
    if run_dir is None or not (Path(run_dir) / "state.json").is_file():
        return [Path(run_dir).name if run_dir else "", "", "", "", ""]
    path = Path(run_dir)
    record, _ = refreshed(path, read_record(path))
    beat, metrics = read_heartbeat(path), last_metrics(path)
    age = f"{time.time() - beat['time']:.0f}s ago" if beat else ""
    return [
        path.name,
        record.status.value,
        str(beat["step"]) if beat else "",
        f"{metrics['loss']:.4f}" if "loss" in metrics else "",
        age,
    ]


def _rank(name: str) -> tuple[int, str]:
    for i, prefix in enumerate(_ORDER):
        if name.startswith(prefix):
            return i, name
    return len(_ORDER), name
