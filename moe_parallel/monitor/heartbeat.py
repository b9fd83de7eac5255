"""Per-rank heartbeats: ``RUN_DIR/heartbeats/rank{R}.json``, written by a daemon thread.

Every ``monitor.heartbeat_interval`` seconds each rank's thread writes (atomically: a temporary
file, then ``os.replace``) what the rank is doing::

    {"rank": 1, "host": "n1", "pid": 4242, "started": 1718000000.1,   # rank start (epoch s)
     "time": 1718000042.7, "step": 4,                                  # last finished step
     "phase": "forward-backward", "phase_since": 1718000040.2,
     "rss_bytes": 512000000, "cuda_allocated_bytes": null,             # null on CPU ranks
     "collective": "all_reduce", "collective_since": 1718000041.0,     # null between collectives
     "last_collective": "all_to_all", "collectives": 1234,
     "stacks": "RUN_DIR/stacks/rank1.4242.txt"}

The training loop only sets two module variables (:func:`set_phase`, :func:`set_step`): no file
is written per step. A rank blocked inside a collective (gloo and NCCL release the GIL while
they wait) keeps writing heartbeats that say which collective and since when; the collective
comes from :mod:`moe_parallel.monitor.collectives`, installed here at rank start.

Each rank also registers :data:`cluster.watchdog.STACK_SIGNAL` with
:mod:`faulthandler`: on that signal the C-level handler writes every thread's Python stack to the
rank's ``stacks`` file, even while the main thread is stuck in C++ (the watchdog sends it before
it stops a hung run).
"""

from __future__ import annotations

import faulthandler
import json
import os
import socket
import threading
import time
from pathlib import Path

import psutil

from cluster.registry import HEARTBEATS_DIR, STACKS_DIR
from cluster.watchdog import STACK_SIGNAL

from . import collectives

PHASES = ("startup", "data", "forward-backward", "optimizer", "checkpoint", "eval", "done")

_status: dict = {"step": None, "phase": "startup", "phase_since": time.time()}
_active: "RankMonitor | None" = None


def set_phase(phase: str) -> None:
    """What the rank does from now on (a dict write: cheap enough for every phase change)."""
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}: allowed phases are {', '.join(PHASES)}")
    _status["phase"], _status["phase_since"] = phase, time.time()


def set_step(step: int) -> None:
    """The last step this rank finished (or resumed at). Raises when the heartbeat thread died:
    without heartbeats the watchdog would take the rank for hung."""
    _status["step"] = int(step)
    if _active is not None and _active.error is not None:
        raise RuntimeError(
            f"rank {_active.rank}'s heartbeat thread failed: {_active.error!r}"
        ) from _active.error


def heartbeat_path(run_dir: Path | str, rank: int) -> Path:
    return Path(run_dir) / HEARTBEATS_DIR / f"rank{rank}.json"


class RankMonitor:
    """The heartbeat thread and the stack-dump handler of one rank (see the module docstring)."""

    def __init__(self, run_dir: Path | str, rank: int, interval_s: float, device: str = "cpu"):
        self.run_dir, self.rank, self.interval_s = Path(run_dir), rank, interval_s
        self.on_gpu = device == "cuda"
        self.path = heartbeat_path(self.run_dir, rank)
        self.process = psutil.Process()
        # started: this clock, not the process's create_time (psutil derives that from the boot
        # time, whole seconds): the watchdog compares it with the attempt's start.
        self.static = {
            "rank": rank,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": time.time(),
        }
        self.stacks_path = self.run_dir / STACKS_DIR / f"rank{rank}.{os.getpid()}.txt"
        self._stacks_file = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat:rank{rank}", daemon=True)
        self.error: BaseException | None = None

    def start(self) -> "RankMonitor":
        collectives.install()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.stacks_path.parent.mkdir(parents=True, exist_ok=True)
        self._stacks_file = open(self.stacks_path, "w")  # kept open: faulthandler writes to its fd
        faulthandler.register(STACK_SIGNAL, file=self._stacks_file, all_threads=True, chain=False)
        self.write()  # a first heartbeat before the thread's first tick
        self._thread.start()
        global _active
        _active = self
        return self

    def stop(self) -> None:
        """Last heartbeat (phase ``done``) and stop the thread; the stack handler stays."""
        self._stop.set()
        self._thread.join(timeout=10)
        set_phase("done")
        self.write()
        if self.error is not None:
            raise RuntimeError(
                f"rank {self.rank}'s heartbeat thread failed: {self.error!r}"
            ) from self.error

    def beat(self) -> dict:
        now = time.time()
        coll = collectives.snapshot()
        memory = self.process.memory_info().rss
        cuda = None
        if self.on_gpu:
            import torch

            cuda = torch.cuda.memory_allocated()
        return {
            **self.static,
            "time": now,
            "step": _status["step"],
            "phase": _status["phase"],
            "phase_since": _status["phase_since"],
            "rss_bytes": memory,
            "cuda_allocated_bytes": cuda,
            "collective": coll["current"],
            "collective_since": coll["entered"] if coll["current"] else None,
            "last_collective": coll["last"],
            "collectives": coll["calls"],
            "stacks": str(self.stacks_path),
        }

    def write(self) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(self.beat()))
        os.replace(tmp, self.path)

    def _run(self) -> None:
        try:
            while not self._stop.wait(self.interval_s):
                self.write()
        except BaseException as exc:  # kept and raised by stop(); the rank's log says it now
            self.error = exc
            print(f"rank {self.rank}: heartbeat thread stopped: {exc!r}", flush=True)
            raise


def start_rank_monitor(
    run_dir: Path | str, rank: int, interval_s: float, device: str = "cpu"
) -> RankMonitor:
    return RankMonitor(run_dir, rank, interval_s, device).start()
