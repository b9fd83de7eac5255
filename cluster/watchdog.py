"""Hang detection on the launcher side, from the ranks' heartbeats (backend-neutral).

A launcher (the local backend's supervisor, a SLURM task, the Ray driver) polls
:meth:`HangWatchdog.check` about once a second while its ranks are alive. The watchdog arms when
every rank of the attempt has left ``startup`` (hangs before the first step, e.g. in the
rendezvous, are left to torch.distributed's own timeout), and reports a hang when no rank's
``step`` changed for ``hang_timeout`` seconds. The launcher then sends :data:`STACK_SIGNAL` to
every rank (:func:`dump_stacks`: faulthandler writes all Python stacks to the rank's file under
``RUN_DIR/stacks/``), records the hang (:func:`record_hang`: waits for the stack files, writes
the :class:`cluster.registry.Hang` to ``state.json`` and prints it), stops the ranks and
restarts from the latest checkpoint.

Only the standard library and :mod:`cluster.registry`: launchers import it without torch.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import TextIO

from cluster import registry
from cluster.registry import Hang, RunRecord, now_iso, read_rank_heartbeats

# SIGUSR1/SIGUSR2/SIGTERM are the preemption signals (moe_parallel.train.preemption). SIGURG's
# default action is "ignore", so a rank that has not registered its handler yet is not harmed.
STACK_SIGNAL = signal.SIGURG


def hang_signature(step: int | None, timeout_s: float) -> str:
    """The restart reason of a hang: equal for the same hang at the same step (restart policy)."""
    return f"hang: no rank finished a step for {timeout_s:.0f} s after step {step}"


class HangWatchdog:
    """Decides from heartbeats whether an attempt's ranks hang.

    ``since``: the attempt's start (epoch seconds); heartbeats of processes started before it
    (an earlier attempt's files) are ignored.
    """

    def __init__(self, hang_timeout_s: float, world_size: int, since: float) -> None:
        if hang_timeout_s <= 0:
            raise ValueError(f"hang_timeout must be > 0 seconds, got {hang_timeout_s}")
        self.timeout_s, self.world_size, self.since = float(hang_timeout_s), world_size, since
        self.armed_at: float | None = None
        self.marker: tuple | None = None
        self.last_progress: float | None = None
        self.last_beats: dict[int, dict] = {}

    def check(self, run_dir: Path | str, now: float | None = None) -> dict | None:
        return self.observe(read_rank_heartbeats(run_dir, self.world_size), now)

    def observe(self, beats: dict[int, dict], now: float | None = None) -> dict | None:
        """None, or the hang: a dict ready for :class:`cluster.registry.Hang` (see :meth:`hang`)."""
        now = time.time() if now is None else now
        current = {r: b for r, b in beats.items() if b.get("started", 0.0) >= self.since - 1.0}
        self.last_beats = current
        if self.armed_at is None:
            if len(current) < self.world_size or any(
                b["phase"] == "startup" for b in current.values()
            ):
                return None
            self.armed_at = now
        marker = tuple(current[r]["step"] for r in range(self.world_size))
        if marker != self.marker:
            self.marker, self.last_progress = marker, now
            return None
        if now - self.last_progress < self.timeout_s:
            return None
        return self.hang(now)

    def hang(self, now: float) -> dict:
        steps = [s for s in self.marker if s is not None]
        step = min(steps) if steps else None
        ranks = []
        for rank in range(self.world_size):
            beat = self.last_beats[rank]
            ranks.append(
                {
                    "rank": rank,
                    "host": beat["host"],
                    "pid": beat["pid"],
                    "step": beat["step"],
                    "phase": beat["phase"],
                    "collective": beat["collective"],
                    "in_collective_s": (
                        round(now - beat["collective_since"], 1)
                        if beat.get("collective_since")
                        else None
                    ),
                    "last_collective": beat["last_collective"],
                    "heartbeat_age_s": round(now - beat["time"], 1),
                    "stacks": beat["stacks"],
                }
            )
        return {
            "at": now_iso(),
            "step": step,
            "hang_timeout_s": self.timeout_s,
            "idle_s": round(now - self.last_progress, 1),
            "last_progress": self.last_progress,
            "detected": now,
            "ranks": ranks,
            "stacks": [r["stacks"] for r in ranks],
        }


def make_hang(found: dict, attempt: str, stacks_written: dict[str, bool]) -> Hang:
    missing = [p for p, ok in stacks_written.items() if not ok]
    return Hang(
        at=found["at"],
        attempt=attempt,
        step=found["step"],
        hang_timeout_s=found["hang_timeout_s"],
        idle_s=found["idle_s"],
        ranks=found["ranks"],
        stacks=found["stacks"],
        stacks_missing=missing,
    )


def dump_stacks(pids: list[int]) -> None:
    """Ask every (local) rank to write its Python stacks. A rank that exited meanwhile is
    skipped: its stack file then stays empty and is listed as missing."""
    for pid in pids:
        try:
            os.kill(pid, STACK_SIGNAL)
        except ProcessLookupError:
            continue


def wait_for_stacks(paths: list[str], timeout_s: float = 10.0) -> dict[str, bool]:
    """Whether each stack file was written (non-empty and no longer growing) within timeout."""
    deadline = time.monotonic() + timeout_s
    sizes: dict[str, int] = {}
    while True:
        done = {}
        for path in paths:
            size = os.path.getsize(path) if os.path.exists(path) else 0
            done[path] = size > 0 and sizes.get(path) == size
            sizes[path] = size
        if all(done.values()) or time.monotonic() >= deadline:
            return done
        time.sleep(0.2)


def record_hang(
    run_dir: Path | str,
    found: dict,
    attempt: str,
    out: TextIO | None = None,
    record: RunRecord | None = None,
) -> Hang:
    """Record a hang the watchdog found, once its ranks were asked for their stacks
    (:func:`dump_stacks`): wait for the stack files, add the :class:`Hang` to ``state.json`` and
    print it on ``out`` (default stdout: the launcher's own output).

    ``record``: the run's record when the caller holds it and writes it whole (the local
    launcher): the hang is added to it and it is written. Otherwise the hang is added to
    ``state.json`` under its lock (a SLURM task, the Ray driver: another process may write it).
    """
    hang = make_hang(found, attempt, wait_for_stacks(found["stacks"]))
    print(f"moe-parallel: {describe(hang)}", file=out or sys.stdout, flush=True)
    if record is None:
        registry.update_record(run_dir, lambda current: current.hangs.append(hang))
    else:
        record.hangs.append(hang)
        registry.write_record(run_dir, record)
    return hang


def describe(hang: Hang) -> str:
    """The hang for humans (the launcher's output, the ranks' logs)."""
    lines = [
        f"HANG DETECTED at {hang.at} (attempt {hang.attempt}): no rank finished a step for "
        f"{hang.idle_s:.0f} s (monitor.hang_timeout={hang.hang_timeout_s:.0f}) after step "
        f"{hang.step}"
    ]
    for r in hang.ranks:
        where = (
            f"inside {r['collective']} for {r['in_collective_s']:.0f} s"
            if r["collective"]
            else f"not in a collective (last: {r['last_collective']})"
        )
        lines.append(
            f"  rank {r['rank']} on {r['host']} pid {r['pid']}: step {r['step']}, phase "
            f"{r['phase']}, {where}; heartbeat {r['heartbeat_age_s']:.0f} s old; "
            f"stacks: {r['stacks']}"
        )
    if hang.stacks_missing:
        lines.append(f"  stacks NOT written within the wait: {', '.join(hang.stacks_missing)}")
    return "\n".join(lines)


def status_lines(
    run_dir: Path | str, hangs: list[Hang], world_size: int, running: bool, now: float | None = None
) -> list[str]:
    """``moectl status RUN_DIR``: each rank's heartbeat while the run is alive, then every hang
    the watchdog recorded (when, after which step, where each rank was, its stack file)."""
    now = time.time() if now is None else now
    lines = []
    for rank, beat in sorted(read_rank_heartbeats(run_dir, world_size).items()) if running else []:
        where = (
            f"in {beat['collective']} for {now - beat['collective_since']:.0f} s"
            if beat["collective"]
            else "not in a collective"
        )
        lines.append(
            f"rank {rank}:    step {beat['step']}, {beat['phase']} for "
            f"{now - beat['phase_since']:.0f} s, {where}, "
            f"rss {beat['rss_bytes'] / 2**20:.0f} MiB, heartbeat {now - beat['time']:.0f} s "
            f"ago ({beat['host']} pid {beat['pid']})"
        )
    for hang in hangs:
        lines.append(
            f"hang:      {hang.at} attempt {hang.attempt}: no step for {hang.idle_s:.0f} s "
            f"after step {hang.step}"
        )
        for r in hang.ranks:
            where = r["collective"] or f"no collective (last {r['last_collective']})"
            lines.append(
                f"           rank {r['rank']}: {r['phase']}, {where}; stacks {r['stacks']}"
            )
    return lines
