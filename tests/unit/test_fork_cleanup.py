"""A rank's forked helpers (Megatron's checkpoint writers, the results manager) die with it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil

# A stand-in rank: installs the hook as init_distributed does, forks a child from the main
# thread that would sleep for a minute, prints the child's pid and waits to be killed.
RANK = """
import multiprocessing as mp, sys, time
from cluster.procs import forks_die_with_their_parent
if sys.argv[1] == "hook":
    forks_die_with_their_parent()
child = mp.get_context("fork").Process(target=time.sleep, args=(60,))
child.start()
print(child.pid, flush=True)
time.sleep(60)
"""


def _forked_child_after_rank_killed(mode: str, wait_s: float) -> psutil.Process:
    rank = subprocess.Popen(
        [sys.executable, "-c", RANK, mode],
        stdout=subprocess.PIPE,
        text=True,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
    )
    child = psutil.Process(int(rank.stdout.readline()))
    rank.send_signal(signal.SIGKILL)
    rank.wait()
    deadline = time.monotonic() + wait_s
    while (
        time.monotonic() < deadline
        and child.is_running()
        and child.status() != psutil.STATUS_ZOMBIE
    ):
        time.sleep(0.05)
    return child


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_fork_of_a_killed_rank_dies_with_it():
    child = _forked_child_after_rank_killed("hook", wait_s=10)
    assert not _alive(child)


def test_without_the_hook_the_fork_outlives_the_rank():
    """The control: what the hook prevents does happen without it."""
    child = _forked_child_after_rank_killed("none", wait_s=1)
    try:
        assert _alive(child) and child.ppid() != os.getpid()
    finally:
        child.kill()
