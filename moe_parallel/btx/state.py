"""The BTX driver's state on disk: ``PLAN_RUN/btx.json``, rewritten atomically after each change.

A stage (``seed``, ``branch:<domain>``, ``mix``, ``finetune``, ``eval``) records its run
directory, its state and what it produced; the runs themselves keep their own ``state.json``,
so `moectl btx status` can show live progress and `moectl btx resume` can re-attach to runs
that are still going, restart the ones that stopped, and skip the finished ones.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import psutil

STATE_FILE = "btx.json"
# Stage states: pending -> running -> done | failed | skipped
DONE, FAILED, PENDING, RUNNING, SKIPPED = "done", "failed", "pending", "running", "skipped"


@dataclass
class Stage:
    state: str = PENDING
    run_dir: Optional[str] = None
    attempts: int = 0  # submissions of this stage's run (1 = no restart)
    checkpoint: Optional[str] = None  # what the stage produced
    message: Optional[str] = None
    started: Optional[float] = None  # unix time of the first submission
    ended: Optional[float] = None


@dataclass
class BtxState:
    plan: str  # the plan as copied into PLAN_RUN
    backend: str
    cluster: Optional[str] = None
    profile_overrides: list[str] = field(default_factory=list)
    status: str = RUNNING  # running | waiting | completed | failed
    message: Optional[str] = None
    driver_pid: Optional[int] = None
    driver_started: Optional[float] = None  # the process's create time (pid reuse guard)
    driver_host: Optional[str] = None
    started: Optional[float] = None
    ended: Optional[float] = None
    stages: dict[str, Stage] = field(default_factory=dict)

    def stage(self, name: str) -> Stage:
        return self.stages.setdefault(name, Stage())

    def claim_driver(self) -> None:
        self.driver_pid = os.getpid()
        self.driver_started = psutil.Process().create_time()
        self.driver_host = socket.gethostname()

    def driver_alive(self) -> bool:
        if self.driver_pid is None or self.driver_host != socket.gethostname():
            return False
        try:
            proc = psutil.Process(self.driver_pid)
            return (
                abs(proc.create_time() - (self.driver_started or 0)) < 1.0
                and proc.status() != psutil.STATUS_ZOMBIE
            )
        except psutil.NoSuchProcess:
            return False


def read_state(plan_run: Path) -> BtxState:
    path = Path(plan_run) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{plan_run} is not a BTX plan run (no {STATE_FILE})")
    data = json.loads(path.read_text())
    data["stages"] = {k: Stage(**v) for k, v in data.get("stages", {}).items()}
    return BtxState(**data)


def write_state(plan_run: Path, state: BtxState) -> None:
    path = Path(plan_run) / STATE_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(state), indent=1))
    os.replace(tmp, path)  # readers see the old or the new state, never half of one
