"""What the test beds share: commands, daemons, processes, network namespaces, a lock, the CLI.

Every failure of a test bed is a ``LocalClusterError`` (the beds' own errors subclass it), with
the failed command and the end of its output or of the logs that say why in the message.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import psutil

from cluster.locks import LockTimeout, exclusive_lock
from cluster.procs import is_gone, signal_proc

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self from Python 3.11

CMD_TIMEOUT_S = 30
NETNS_DIR = Path("/run/netns")  # where `ip netns add` puts a namespace's handle
NET_DIR = Path("/sys/class/net")  # the root namespace's network interfaces
# The Debian package of each tool the network set-up needs, for the error message when it is missing.
TOOL_PACKAGES = {"ip": "iproute2", "nsenter": "util-linux", "unshare": "util-linux"}

_F = TypeVar("_F", bound=Callable)


class LocalClusterError(RuntimeError):
    """A local test cluster could not be installed, started or stopped (details in the message)."""


class JsonRecord:
    """``to_json``/``from_json`` for a frozen dataclass describing a running bed (lists read back
    as the tuples the dataclass holds)."""

    def to_json(self) -> dict:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_json(cls, data: dict) -> Self:
        return cls(
            **{
                key: tuple(value) if isinstance(value, list) else value
                for key, value in data.items()
            }
        )


# --------------------------------------------------------------------------- commands


def run(
    args: list[str], timeout: float = CMD_TIMEOUT_S, check: bool = True, input: str | None = None
) -> subprocess.CompletedProcess:
    """Run a command with a timeout; with ``check`` a failure raises with the command's stderr."""
    # ``input`` goes to the command's stdin; without it the command reads nothing (not ours).
    feed = {"input": input} if input is not None else {"stdin": subprocess.DEVNULL}
    try:
        done = subprocess.run(
            args, capture_output=True, text=True, timeout=timeout, check=False, **feed
        )
    except FileNotFoundError as exc:
        raise LocalClusterError(f"{args[0]} not found: {exc}") from exc
    except subprocess.TimeoutExpired as exc:
        raise LocalClusterError(
            f"{shlex.join(args)} did not finish within {timeout:.0f} s"
        ) from exc
    if check and done.returncode != 0:
        out = (done.stderr.strip() or done.stdout.strip())[-2000:]
        raise LocalClusterError(f"{shlex.join(args)} failed (exit {done.returncode}): {out}")
    return done


def attempt(args: list[str]) -> list[str]:
    """Run a cleanup command; its failure is returned (not raised) so that a stop goes on with
    the other steps and reports every failure at the end."""
    try:
        run(args)
    except LocalClusterError as exc:
        return [str(exc)]
    return []


def start_detached(
    args: list[str],
    what: str,
    out_path: Path,
    timeout: float = CMD_TIMEOUT_S,
    env: dict[str, str] | None = None,
    logs: Callable[[], str] = lambda: "",
) -> None:
    """Run a command that leaves daemons behind (a self-daemonizing program, `ray start`).

    Its output goes to ``out_path``, not a pipe: a daemon that keeps an inherited pipe open would
    block ``subprocess.run`` until its timeout.  On failure the message ends with ``logs()``."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with out_path.open("w") as out:
        out.write(f"$ {shlex.join(args)}\n")
        out.flush()
        streams = {"stdin": subprocess.DEVNULL, "stdout": out, "stderr": subprocess.STDOUT}
        try:
            code = subprocess.run(args, env=env, timeout=timeout, check=False, **streams).returncode
        except subprocess.TimeoutExpired as exc:
            raise LocalClusterError(
                f"starting {what} ({shlex.join(args)}) did not return within {timeout:.0f} s"
                f"\n{logs()}"
            ) from exc
    if code != 0:
        raise LocalClusterError(
            f"starting {what} failed (exit {code}): {shlex.join(args)}\n{logs()}"
        )


def tail(path: Path, lines: int = 25) -> str:
    """The last lines of a log file, headed by its path, for error messages."""
    if not path.is_file():
        return f"--- {path}: (no such file)"
    text = path.read_text(errors="replace").splitlines()[-lines:]
    return f"--- last {len(text)} lines of {path}:\n" + "\n".join(text)


def require_tools(*tools: str, purpose: str) -> None:
    """Raise naming the packages to install when one of the commands is not on PATH."""
    missing = [t for t in tools if not shutil.which(t)]
    if missing:
        named = " and ".join(f"`{t}` ({TOOL_PACKAGES[t]})" for t in missing)
        packages = " ".join(sorted({TOOL_PACKAGES[t] for t in missing}))
        raise LocalClusterError(f"{named} needed for {purpose}: apt-get install -y {packages}")


@contextmanager
def undone_on_failure(
    undo: Callable[[], object], what: str, error: type[LocalClusterError] = LocalClusterError
) -> Iterator[None]:
    """Run ``undo`` when the body fails (whatever the exception), then re-raise; when ``undo``
    fails too, raise ``error`` with both messages."""
    try:
        yield
    except BaseException as exc:
        try:
            undo()
        except LocalClusterError as undo_exc:
            raise error(f"{exc}\n\n{what} also failed: {undo_exc}") from exc
        raise


# --------------------------------------------------------------------------- processes


def read_pid(path: Path) -> int | None:
    """The pid in a pid file when that process is alive (not a zombie), else None."""
    try:
        pid = int(path.read_text().split()[0])
    except (FileNotFoundError, IndexError, ValueError):
        return None
    try:
        return None if is_gone(psutil.Process(pid)) else pid
    except psutil.NoSuchProcess:
        return None


def process_name(proc: psutil.Process) -> str:
    try:
        return proc.name()
    except psutil.NoSuchProcess:
        return "gone"


def kill(pids: Iterable[int], term_grace_s: float | None = None, wait_s: float = 5) -> list[str]:
    """SIGKILL the processes (after a SIGTERM and ``term_grace_s`` seconds for those still alive,
    when given) and wait up to ``wait_s`` for them to go; returns a line per survivor.  This
    process itself is never signalled."""
    procs = []
    for pid in pids:
        if pid == os.getpid():
            continue
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            continue
    if term_grace_s is not None:
        for proc in procs:
            signal_proc(proc, signal.SIGTERM)
        _, procs = psutil.wait_procs(procs, timeout=term_grace_s)
    for proc in procs:
        signal_proc(proc, signal.SIGKILL)
    _, alive = psutil.wait_procs(procs, timeout=wait_s)
    return [f"pid {p.pid} ({process_name(p)}) survived SIGKILL" for p in alive]


# --------------------------------------------------------------------------- network namespaces


def link_exists(name: str) -> bool:
    """Whether a network interface of that name exists in the root namespace."""
    return (NET_DIR / name).exists()


def netns_path(netns: str) -> Path:
    return NETNS_DIR / netns


def nsenter_net(netns: str) -> list[str]:
    """Command prefix that runs a program in a namespace's network only.  ``ip netns exec`` would
    also give it a private mount namespace with a remounted /sys (slurmd then finds no cgroup
    filesystem)."""
    return ["nsenter", f"--net={netns_path(netns)}"]


def netns_pids(netns: str) -> list[int]:
    """Every process inside a network namespace ([] when it does not exist)."""
    if not netns_path(netns).exists():
        return []
    return [int(p) for p in run(["ip", "netns", "pids", netns]).stdout.split()]


def add_bridge(bridge: str, addr: str) -> None:
    """A bridge in the root namespace holding ``addr`` (/24), up."""
    run(["ip", "link", "add", bridge, "type", "bridge"])
    run(["ip", "addr", "add", f"{addr}/24", "dev", bridge])
    run(["ip", "link", "set", bridge, "up"])


def add_netns_host(netns: str, addr: str, bridge: str, outer_if: str, inner_if: str) -> None:
    """A simulated host: network namespace ``netns`` joined to ``bridge`` by a veth pair (``outer_if``
    on the bridge, ``inner_if`` inside holding ``addr``/24), its loopback up."""
    run(["ip", "netns", "add", netns])
    run(["ip", "link", "add", outer_if, "type", "veth", "peer", "name", inner_if, "netns", netns])
    run(["ip", "link", "set", outer_if, "master", bridge])
    run(["ip", "link", "set", outer_if, "up"])
    run(["ip", "-n", netns, "addr", "add", f"{addr}/24", "dev", inner_if])
    run(["ip", "-n", netns, "link", "set", inner_if, "up"])
    run(["ip", "-n", netns, "link", "set", "lo", "up"])


def teardown_network(namespaces: Sequence[str], outer_ifs: Sequence[str], bridge: str) -> list[str]:
    """Delete the namespaces, the veths and the bridge, whichever exist; returns the errors met."""
    errors: list[str] = []
    for netns in namespaces:
        if netns_path(netns).exists():
            errors += attempt(["ip", "netns", "del", netns])
    # A veth normally goes with the namespace (its peer lived there), but the kernel removes it
    # a moment after `ip netns del` returns: deleting it at once races ("Cannot find device").
    deadline = time.monotonic() + 5
    while any(link_exists(link) for link in outer_ifs) and time.monotonic() < deadline:
        time.sleep(0.1)
    for link in outer_ifs:
        if link_exists(link):
            failed = attempt(["ip", "link", "del", link])
            if link_exists(link):
                errors += failed
    if link_exists(bridge):
        errors += attempt(["ip", "link", "del", bridge])
    return errors


# --------------------------------------------------------------------------- lock


class ReentrantLock:
    """``exclusive_lock`` on a file, so that two processes (say two test sessions) do not start or
    stop a bed at the same time; re-entrant within a process (a start may call stop under it).
    Use it as a context manager or as a decorator."""

    def __init__(self, path: Path, timeout_s: float, activity: str) -> None:
        self.path = path
        self.timeout_s = timeout_s
        self.activity = activity  # for the timeout message: "starting or stopping the ..."
        self._depth = 0
        self._held: ExitStack | None = None

    def __enter__(self) -> None:
        if self._depth == 0:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            held = ExitStack()
            try:
                held.enter_context(exclusive_lock(self.path, timeout_s=self.timeout_s))
            except LockTimeout:
                raise LocalClusterError(
                    f"another process has been {self.activity} for more than "
                    f"{self.timeout_s:.0f} s (it holds {self.path})"
                ) from None
            self._held = held
        self._depth += 1

    def __exit__(self, *exc_info: object) -> None:
        self._depth -= 1
        if self._depth == 0 and self._held is not None:
            held, self._held = self._held, None
            held.close()

    def __call__(self, func: _F) -> _F:
        @functools.wraps(func)
        def wrapper(*args, **kwargs):
            with self:
                return func(*args, **kwargs)

        return wrapper  # type: ignore[return-value]


# --------------------------------------------------------------------------- command line


@dataclass(frozen=True)
class Command:
    """A subcommand of a bed's CLI: ``action(args)`` returns the exit code (None: 0)."""

    name: str
    help: str
    action: Callable[[argparse.Namespace], int | None]
    options: tuple[tuple[tuple[str, ...], dict[str, Any]], ...] = field(default=())


def option(*flags: str, **kwargs: Any) -> tuple[tuple[str, ...], dict[str, Any]]:
    """An ``add_argument(*flags, **kwargs)`` of a Command."""
    return flags, kwargs


def print_json(data: dict) -> int:
    print(json.dumps(data, indent=1))
    return 0


def stop_command(stop: Callable[[], None], help: str) -> Command:
    def action(_args: argparse.Namespace) -> int:
        stop()
        print("stopped")
        return 0

    return Command("stop", help, action)


def status_command(describe: Callable[[], dict | None]) -> Command:
    """``status``: the running bed as JSON (``describe()``), or exit 1 when it is not running."""

    def action(_args: argparse.Namespace) -> int:
        data = describe()
        if data is None:
            print("not running")
            return 1
        return print_json(data)

    return Command("status", "print the running cluster as JSON (exit 1 when not running)", action)


def run_cli(prog: str, doc: str | None, commands: Sequence[Command], argv: list[str] | None) -> int:
    """Parse ``argv`` and run the chosen command; a LocalClusterError prints ``error: ...`` and
    exits 2."""
    parser = argparse.ArgumentParser(prog=prog, description=(doc or "").split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for command in commands:
        parser_of = sub.add_parser(command.name, help=command.help)
        for flags, kwargs in command.options:
            parser_of.add_argument(*flags, **kwargs)
    args = parser.parse_args(argv)
    action = next(c.action for c in commands if c.name == args.command)
    try:
        code = action(args)
    except LocalClusterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0 if code is None else code
