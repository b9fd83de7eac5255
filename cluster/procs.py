"""Finding and killing every process of a run: the rank process groups and their descendants.

Each local rank starts in its own session, so its process group id is its pid and
``os.killpg`` reaches the rank and every child that stayed in the group, even after the rank
itself exited.  Children that left the group (setsid) are found with psutil while the rank is
alive and killed one by one.  Zombies count as gone: they hold no resources but a pid, and the
process that must reap them (init, or a reaped rank's parent) is not ours to control.
"""

from __future__ import annotations

import ctypes
import os
import signal
import time
from collections.abc import Callable, Iterable

import psutil


def is_gone(proc: psutil.Process) -> bool:
    """True when ``proc`` has exited (a zombie counts as exited)."""
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def descendants(pids: Iterable[int]) -> list[psutil.Process]:
    """The live descendants of ``pids`` (processes that exited already are skipped)."""
    found: list[psutil.Process] = []
    for pid in pids:
        try:
            found.extend(psutil.Process(pid).children(recursive=True))
        except psutil.NoSuchProcess:
            continue  # exited: its children were reparented and are found by group instead
    return found


def group_members(pgids: set[int]) -> list[psutil.Process]:
    """Every live, non-zombie process whose process group is one of ``pgids``."""
    members: list[psutil.Process] = []
    me = os.getpid()
    for proc in psutil.process_iter():
        if proc.pid == me:
            continue
        try:
            if os.getpgid(proc.pid) in pgids and not is_gone(proc):
                members.append(proc)
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue  # exited while we looked
    return members


def signal_group(pgid: int, sig: int) -> bool:
    """Send ``sig`` to process group ``pgid``; False when the group no longer exists."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    return True


def signal_proc(proc: psutil.Process, sig: int) -> None:
    try:
        proc.send_signal(sig)
    except psutil.NoSuchProcess:
        return  # already gone, which is what we want


def kill_run(
    pgids: set[int],
    tracked: Iterable[psutil.Process],
    ranks_done: Callable[[], bool],
    grace_s: float,
    final_wait_s: float = 10.0,
) -> list[psutil.Process]:
    """SIGTERM every process of the run, SIGKILL what is left after ``grace_s``.

    ``ranks_done`` says whether the rank processes themselves (our children, reaped by their
    own waiter threads) have exited.  Returns the processes still alive at the end, which is
    empty unless a process is stuck in the kernel.
    """
    others = _unique([*group_members(pgids), *tracked])
    _send_all(pgids, others, signal.SIGTERM)
    if _wait(others, ranks_done, grace_s):
        return []
    others = _unique([*group_members(pgids), *[p for p in others if not is_gone(p)]])
    _send_all(pgids, others, signal.SIGKILL)
    _wait(others, ranks_done, final_wait_s)
    return [p for p in _unique([*group_members(pgids), *others]) if not is_gone(p)]


def _send_all(pgids: set[int], procs: list[psutil.Process], sig: int) -> None:
    for pgid in pgids:
        signal_group(pgid, sig)
    for proc in procs:
        signal_proc(proc, sig)


def _wait(procs: list[psutil.Process], ranks_done: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while True:
        if ranks_done() and all(is_gone(p) for p in procs):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


def _unique(procs: Iterable[psutil.Process]) -> list[psutil.Process]:
    seen: dict[int, psutil.Process] = {}
    for proc in procs:
        seen.setdefault(proc.pid, proc)
    return list(seen.values())


_PR_SET_PDEATHSIG = 1
# Resolved once, here in the parent: die_with_parent runs between fork and exec (preexec_fn) or
# right after a fork (the at-fork hook), where a forked child of a threaded process must not
# load libraries or look up symbols (the loader's locks may have been held by another thread).
_PRCTL = ctypes.CDLL("libc.so.6", use_errno=True).prctl


def die_with_parent() -> None:
    """``preexec_fn`` for a rank started by a per-rank supervisor (a SLURM task, a Ray actor):
    the kernel SIGKILLs the rank when the supervisor dies. Without it a rank whose supervisor was
    killed is re-parented to init, escapes the scheduler's process tracking, and keeps blocking
    in a collective."""
    _PRCTL(_PR_SET_PDEATHSIG, signal.SIGKILL)


_forker_pid = [0]


def forks_die_with_their_parent() -> None:
    """Every later ``os.fork`` of this process (Megatron's checkpoint writer processes, the
    results manager, the async-save caller) gets PR_SET_PDEATHSIG, like the rank itself.

    Why: a rank SIGKILLed in the middle of a save (its supervisor died) left a forked writer
    behind, re-parented to init and alive past the run's end (seen in CI on Ray). A child forked
    by a short-lived thread would die with that thread; the forks here come from the main
    thread of the rank or of its async writer. Idempotent; subprocess launches (fork+exec in C)
    are not affected."""
    if _forker_pid[0]:
        return
    _forker_pid[0] = os.getpid()
    os.register_at_fork(before=_remember_forker, after_in_child=_die_with_forker)


def _remember_forker() -> None:
    _forker_pid[0] = os.getpid()


def _die_with_forker() -> None:
    die_with_parent()
    if os.getppid() != _forker_pid[0]:  # the parent died before the prctl took effect
        os._exit(1)


def kill_group(pgid: int) -> None:
    """SIGKILL a finished rank's process group (a rank started with start_new_session leads
    its group, and its forks stay in it); nothing to do when the group is already empty."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_supervised(
    argv: list[str],
    env: dict[str, str],
    log_path,
    header: str,
    forward: tuple[int, ...] = (),
    poll=None,
) -> int:
    """Run one rank under a per-rank supervisor (a SLURM task, a Ray actor) and return its exit
    code (negative: killed by that signal).

    The rank appends to its log after a header line, leads its own process group (whatever it
    forks is killed with the group when it ends), dies with the supervisor (PDEATHSIG), and
    receives the ``forward`` signals the supervisor gets. ``poll``: called with the child every
    second while it runs (it may stop the child).
    """
    import subprocess

    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"==== {header} ====\n".encode())
        log.flush()
        child = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**env, "PYTHONUNBUFFERED": "1"},
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
    previous = {s: signal.signal(s, lambda signum, _f: child.send_signal(signum)) for s in forward}
    try:
        if poll is None:
            return child.wait()
        while True:  # ``poll(child)`` every second while the rank runs (the hang watchdog)
            try:
                return child.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                poll(child)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        kill_group(child.pid)  # whatever the rank forked and left behind
