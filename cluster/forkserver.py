"""Rank processes forked from a server that imported the heavy modules once.

A rank of a CPU run spends most of its start-up importing: torch, Megatron-core and TorchDynamo
took 4.6 of the 7.6 CPU-seconds of a 3-step tiny rank (measured on this machine kind,
docs/results/test_suite.md), and a launcher that starts many runs (a BTX plan, restarts, the
test suite) pays it for every rank of every attempt. With ``RunSpec.preload`` the local backend
starts one server per launcher process and set of modules: it imports the modules, then forks
each rank, which runs its ``python -m MODULE ARGS`` entry as a fresh interpreter would (its own
session, environment, working directory, ``sys.argv``, log; ``__main__``; exit status from
``SystemExit``; non-daemon threads joined and ``atexit`` handlers run before it exits).

The server is single-threaded (it refuses to serve when a preloaded module started a thread:
a fork copies only the forking thread, and a lock held by another would stay locked in every
rank). Each rank dies with the server (PDEATHSIG), and the server kills its ranks and exits
when the launcher goes (end of file on its requests), however the launcher ended.

Only for ranks that must not initialise a GPU driver before forking: the caller (the project's
``rank_spec``) asks for preloading on CPU runs only.

Protocol (JSON lines): the launcher writes ``{"argv": [...], "env": {...}, "cwd": ..., "log":
...}``; the server answers ``{"pid": N}`` (or ``{"error": ...}``) and, whenever a rank ends,
``{"exit": N, "code": C}`` (C as ``Popen.returncode``: negative for a signal).
"""

from __future__ import annotations

import atexit
import importlib
import json
import os
import runpy
import select
import signal
import subprocess
import sys
import threading
import traceback
from pathlib import Path

from cluster import procs

# ---------------------------------------------------------------------------------------------
# Launcher side
# ---------------------------------------------------------------------------------------------


class ForkServerError(RuntimeError):
    """The fork server could not start or could not fork a rank."""


class ForkedProcess:
    """A rank forked by the server, with the part of ``subprocess.Popen``'s interface the local
    backend uses (``pid``, ``returncode``, ``poll``, ``wait``, ``send_signal``, ``kill``)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._ended = threading.Event()

    def ended(self, code: int) -> None:
        if self.returncode is None:
            self.returncode = code
        self._ended.set()

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if not self._ended.wait(timeout):
            raise subprocess.TimeoutExpired(f"forked rank {self.pid}", timeout or 0.0)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class ForkServer:
    """One server process: start it with :meth:`start`, fork ranks with :meth:`spawn`."""

    def __init__(self, preload: tuple[str, ...], env: dict[str, str], cwd: str) -> None:
        self.preload, self.env, self.cwd = preload, env, cwd
        self._proc: subprocess.Popen[bytes] | None = None
        self._ranks: dict[int, ForkedProcess] = {}
        self._answers: list[dict] = []
        self._answer = threading.Condition()
        self._requests = threading.Lock()

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, log: Path) -> None:
        """Start the server and wait until its modules are imported (its output goes to
        ``log``); raises ForkServerError with the server's last words when it fails."""
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "cluster.forkserver", *self.preload],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=out,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
            )
        threading.Thread(target=self._read_answers, name="forkserver-reader", daemon=True).start()
        ready = self._next_answer()
        if "ready" not in ready:
            tail = log.read_text(errors="replace").strip().splitlines()[-5:]
            raise ForkServerError(
                f"the fork server for {list(self.preload)} did not start: "
                f"{ready.get('error', 'it exited')}; its log {log} ends: {' | '.join(tail)}"
            )

    def spawn(self, argv: list[str], env: dict[str, str], log: Path) -> ForkedProcess:
        """Fork a rank running ``argv`` (``[python, -m, MODULE, *ARGS]``) with ``env``, its
        output appended to ``log``."""
        module_and_args = module_argv(argv)
        request = {"argv": module_and_args, "env": env, "cwd": self.cwd, "log": str(log)}
        with self._requests:
            assert self._proc is not None and self._proc.stdin is not None
            try:
                self._proc.stdin.write(json.dumps(request).encode() + b"\n")
                self._proc.stdin.flush()
            except (BrokenPipeError, ValueError) as e:
                raise ForkServerError(f"the fork server is gone: {e}") from e
            answer = self._next_answer()
        if "pid" not in answer:
            raise ForkServerError(f"the fork server could not fork {argv}: {answer}")
        return self._ranks[answer["pid"]]

    def stop(self) -> None:
        """Close the server's requests: it kills the ranks still running and exits."""
        if self._proc is not None and self._proc.stdin is not None:
            try:
                self._proc.stdin.close()
            except BrokenPipeError:
                pass
            self._proc.wait()

    def _next_answer(self) -> dict:
        with self._answer:
            self._answer.wait_for(lambda: self._answers)
            return self._answers.pop(0)

    def _read_answers(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            message = json.loads(line)
            if "exit" in message:
                self._ranks.pop(message["exit"]).ended(message["code"])
                continue
            if "pid" in message:  # registered before the spawner sees it
                self._ranks[message["pid"]] = ForkedProcess(message["pid"])
            with self._answer:
                self._answers.append(message)
                self._answer.notify_all()
        # The server is gone: its ranks died with it (PDEATHSIG, or killed by it on the way out).
        for rank in list(self._ranks.values()):
            rank.ended(-signal.SIGKILL)
        with self._answer:
            self._answers.append({"error": "the fork server exited"})
            self._answer.notify_all()


def module_argv(argv: list[str]) -> list[str]:
    """``[MODULE, *ARGS]`` of ``[python, -m, MODULE, *ARGS]``; refuses any other form."""
    if len(argv) < 3 or argv[1] != "-m":
        raise ValueError(
            f"a preloaded rank's entry must be [python, -m, MODULE, ARGS...], got {argv}"
        )
    return argv[2:]


_SERVERS: dict[tuple, ForkServer] = {}
_SERVERS_LOCK = threading.Lock()
_MAX_SERVERS = 2  # each holds the preloaded modules in memory (~0.5 GB with torch and Megatron)


def server_for(preload: tuple[str, ...], env: dict[str, str], log: Path) -> ForkServer:
    """This launcher's server for ``preload`` and ``env`` (the environment the modules are
    imported under: a run with another environment gets another server), started on first use
    and started again if it died."""
    cwd = os.getcwd()
    key = (preload, cwd, tuple(sorted(env.items())))
    with _SERVERS_LOCK:
        server = _SERVERS.get(key)
        if server is None or not server.alive():
            while len(_SERVERS) >= _MAX_SERVERS:
                _SERVERS.pop(next(iter(_SERVERS))).stop()
            server = ForkServer(preload, env, cwd)
            server.start(log)
            _SERVERS[key] = server
        return server


@atexit.register
def _stop_servers() -> None:
    for server in list(_SERVERS.values()):
        server.stop()


# ---------------------------------------------------------------------------------------------
# Server side: python -m cluster.forkserver MODULE...
# ---------------------------------------------------------------------------------------------


def serve(preload: list[str]) -> int:
    answers = os.dup(1)  # answers go to the launcher; fd 1 becomes the log
    os.dup2(2, 1)
    for name in preload:
        importlib.import_module(name)
    if threading.active_count() > 1:
        names = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
        _answer(answers, {"error": f"preloading {preload} started threads {names}"})
        return 1
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # wakes the select below
    children: set[int] = set()
    _answer(answers, {"ready": os.getpid()})
    requests = os.fdopen(0, "rb", buffering=0)
    pending = b""
    while True:
        readable, _, _ = select.select([0, wake_read], [], [])
        if wake_read in readable:
            os.read(wake_read, 4096)
        _reap(children, answers)
        if 0 not in readable:
            continue
        chunk = requests.read(65536)
        if not chunk:  # the launcher is gone
            for pid in children:
                procs.kill_group(pid)
            return 0
        pending += chunk
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            pid = _fork(json.loads(line), closing=(answers, wake_read, wake_write))
            children.add(pid)
            _answer(answers, {"pid": pid})


def _answer(fd: int, message: dict) -> None:
    os.write(fd, json.dumps(message).encode() + b"\n")


def _reap(children: set[int], answers: int) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        children.discard(pid)
        _answer(answers, {"exit": pid, "code": os.waitstatus_to_exitcode(status)})


def _fork(request: dict, closing: tuple[int, ...]) -> int:
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        _become_rank(request, closing)
        code = _run_entry(request["argv"])
    except BaseException:  # noqa: BLE001 -- a rank's start-up failure: print it, exit 1
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return 0  # not reached


def _become_rank(request: dict, closing: tuple[int, ...]) -> None:
    """What ``Popen(argv, env, cwd, start_new_session, stdout=log)`` gives a fresh process."""
    os.setsid()
    procs.die_with_parent()
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for fd in (*closing, 0):
        os.close(fd)
    os.open(os.devnull, os.O_RDONLY)  # fd 0
    log = os.open(request["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])


def _run_entry(module_and_args: list[str]) -> int:
    """Run ``python -m MODULE ARGS``'s module as ``__main__``; its exit status as the
    interpreter would give it."""
    module, *args = module_and_args
    sys.argv = [module, *args]  # run_module puts the module's file in sys.argv[0]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as e:
        code = _exit_code(e.code)
    except BaseException:  # noqa: BLE001 -- as the interpreter: print it, exit 1, then shut down
        traceback.print_exc()
        code = 1
    for thread in threading.enumerate():  # the interpreter joins non-daemon threads at exit
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    return code


def _exit_code(code: object) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(serve(sys.argv[1:]))
