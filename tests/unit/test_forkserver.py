"""The fork server (cluster/forkserver.py): a forked rank sees what a fresh ``python -m`` process
would, ends with the exit status a fresh one would have, and never outlives the server or the
launcher. No mocks: real forks of a real server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from cluster import RunSpec
from cluster.forkserver import ForkServer, ForkServerError

REPO = Path(__file__).resolve().parents[2]
ENTRY = [sys.executable, "-m", "tests.unit.forkserver_entry"]
# A module no rank imports by itself: its presence in a rank proves the rank was forked.
PRELOAD = ("xml.dom.minidom",)


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", **extra}


@pytest.fixture
def server(tmp_path: Path):
    started = ForkServer(PRELOAD, env(), str(tmp_path))
    started.start(tmp_path / "server.log")
    yield started
    started.stop()


def spawn(server: ForkServer, tmp_path: Path, mode: str, **extra: str):
    log = tmp_path / f"{mode}.log"
    return server.spawn([*ENTRY, mode], env(**extra), log), log


def seen(log: Path) -> dict:
    return json.loads(log.read_text().splitlines()[0])


def test_forked_rank_sees_a_fresh_interpreters_process(server, tmp_path: Path) -> None:
    rank, log = spawn(server, tmp_path, "ok", FORK_TEST_VAR="rank-only")
    assert rank.wait(timeout=30) == 0
    got = seen(log)
    assert got["argv"][0].endswith("forkserver_entry.py") and got["argv"][1:] == ["ok"]
    assert got["var"] == "rank-only"  # the rank's environment, not the server's
    assert got["cwd"] == str(tmp_path) and got["stdin"] == ""
    assert got["leads_its_session"] and got["main"] and got["preloaded"]
    text = log.read_text()
    assert "to stderr" in text and text.rstrip().endswith("atexit ran")


@pytest.mark.parametrize(
    "mode,code,last",
    [("exit3", 3, "atexit ran"), ("raise", 1, "atexit ran"), ("thread", 0, "atexit ran")],
)
def test_forked_rank_ends_as_a_fresh_interpreter(server, tmp_path, mode, code, last) -> None:
    rank, log = spawn(server, tmp_path, mode)
    assert rank.wait(timeout=30) == code
    text = log.read_text()
    assert text.rstrip().endswith(last)
    if mode == "raise":
        assert "RuntimeError: boom" in text
    if mode == "thread":  # a non-daemon thread is joined before the exit handlers run
        assert text.index("thread done") < text.index("atexit ran")


def test_signalled_rank_reports_the_signal_like_popen(server, tmp_path: Path) -> None:
    rank, _ = spawn(server, tmp_path, "sleep")
    with pytest.raises(subprocess.TimeoutExpired):
        rank.wait(timeout=0.5)
    rank.kill()
    assert rank.wait(timeout=30) == -signal.SIGKILL and rank.poll() == -signal.SIGKILL


def test_ranks_die_with_the_server(server, tmp_path: Path) -> None:
    rank, log = spawn(server, tmp_path, "sleep")
    deadline = time.monotonic() + 30
    while not log.exists() or not log.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert server._proc is not None
    server._proc.kill()
    assert rank.wait(timeout=30) == -signal.SIGKILL
    deadline = time.monotonic() + 10
    while psutil.pid_exists(rank.pid) and psutil.Process(rank.pid).status() != "zombie":
        assert time.monotonic() < deadline, "the rank outlived its server"
        time.sleep(0.05)


LAUNCHER = """
import sys, time
from pathlib import Path
from cluster.forkserver import server_for
server = server_for(("xml.dom.minidom",), dict(__import__("os").environ), Path(sys.argv[1]) / "s.log")
rank = server.spawn([sys.executable, "-m", "tests.unit.forkserver_entry", "sleep"],
                    dict(__import__("os").environ), Path(sys.argv[1]) / "rank.log")
print(rank.pid, flush=True)
time.sleep(120)
"""


def test_ranks_die_when_the_launcher_is_killed(tmp_path: Path) -> None:
    script = tmp_path / "launcher.py"
    script.write_text(textwrap.dedent(LAUNCHER))
    launcher = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env()
    )
    pid = int(launcher.stdout.readline())
    assert psutil.pid_exists(pid)
    launcher.kill()  # no atexit, no cleanup: the server sees its requests end
    launcher.wait()
    deadline = time.monotonic() + 30
    while psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie":
        assert time.monotonic() < deadline, "the rank outlived its launcher"
        time.sleep(0.05)


def test_preload_that_starts_a_thread_is_refused(tmp_path: Path) -> None:
    server = ForkServer(("tests.unit.forkserver_threads",), env(), str(tmp_path))
    with pytest.raises(ForkServerError, match="started threads \\['started-on-import'\\]"):
        server.start(tmp_path / "server.log")


def test_preload_needs_a_module_entry(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="entry of the form \\[python, -m, MODULE"):
        RunSpec(tmp_path, 1, [sys.executable, "script.py"], preload=("torch",))
