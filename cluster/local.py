"""The local backend: ``world_size`` subprocesses on this machine, supervised by the launcher.

* Every rank runs in its own session (process group), its stdout and stderr going to
  ``run_dir/logs/rank{R}.log``; rank 0's log is also streamed to the launcher's stdout.
* The first rank to exit non-zero (or by a signal) fails the run: every other rank's process
  group and every descendant get SIGTERM, then SIGKILL after ``grace_s``.
* SIGINT / SIGTERM / SIGHUP to the launcher (see :func:`run_local`) cancel the run the same way.
* Whatever the outcome, no process of the run is left behind, and ``state.json`` says what
  happened: which rank failed, with which exit code or signal, and the end of its log.
* With ``RunSpec.hang_timeout_s``, a watchdog reads the ranks' heartbeats: when no rank finishes
  a step for that long, every rank dumps its Python stacks (``RUN_DIR/stacks/``), the hang is
  recorded (``state.json`` ``hangs``, the launcher's output, every rank's log), the ranks are
  stopped and started again, resuming from the latest checkpoint, up to ``max_restarts`` times
  (and never for the same hang at the same step twice: :mod:`cluster.restart_policy`).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import psutil

from cluster import forkserver, procs, registry
from cluster.backend import Backend, RunHandle, RunSpec
from cluster.elastic import clear_grow_back, elastic_env, record_resize, request_grow_back
from cluster.env import EXIT_REQUEUE, OWNED_VARS, RUN_DIR_ENV, free_port, rank_env
from cluster.forkserver import ForkedProcess
from cluster.registry import RankFailure, Restart, RunLayout, RunRecord
from cluster.restart_policy import refuse_restart
from cluster.state import RunState
from cluster.tail import LogStreamer
from cluster.watchdog import HangWatchdog, describe, dump_stacks, hang_signature, record_hang

if TYPE_CHECKING:
    from cluster.profile import ClusterProfile

BACKEND_NAME = "local"


class LaunchError(RuntimeError):
    """A rank could not be started."""


_BACKENDS: weakref.WeakSet[LocalBackend] = weakref.WeakSet()


@atexit.register
def _cancel_all_at_exit() -> None:
    """A launcher that exits without waiting for its runs takes their ranks down with it."""
    for backend in list(_BACKENDS):
        backend._cancel_unfinished()


@dataclass
class _Run:
    """A run this process launched and supervises."""

    spec: RunSpec
    record: RunRecord
    procs: list[subprocess.Popen[bytes]]
    streamer: LogStreamer | None
    exits: queue.Queue[tuple[int, int]] = field(default_factory=queue.Queue)
    exited: dict[int, int] = field(default_factory=dict)
    tracked: dict[int, psutil.Process] = field(default_factory=dict)
    cancel_signal: int | None = None
    cancel_event: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    supervising: threading.Lock = field(default_factory=threading.Lock)
    exit_code: int | None = None
    attempt: int = 0
    watchdog: HangWatchdog | None = None
    world: int = 0  # this attempt's ranks: spec.world_size, or fewer after an elastic shrink
    replicas: int | None = None  # this attempt's data-parallel replicas (elastic runs)
    grow_requested: bool = False

    @property
    def pgids(self) -> set[int]:
        return {p.pid for p in self.procs}

    def ranks_done(self) -> bool:
        return all(p.returncode is not None for p in self.procs)


class LocalBackend(Backend):
    """Ranks as subprocesses of this process.

    ``stream``: True streams rank 0's output to ``sys.stdout``; False streams nothing; a text
    stream receives it instead.  ``grace_s``: seconds between SIGTERM and SIGKILL on teardown.
    ``max_restarts``: restarts after detected hangs (a crashed rank fails the run at once).
    """

    name = BACKEND_NAME

    def __init__(
        self,
        stream: bool | TextIO = True,
        grace_s: float = 5.0,
        poll_s: float = 0.05,
        master_addr: str = "127.0.0.1",
        tail_lines: int = 20,
        max_restarts: int = 3,
    ) -> None:
        self.stream = stream
        self.grace_s = grace_s
        self.poll_s = poll_s
        self.master_addr = master_addr
        self.tail_lines = tail_lines
        self.max_restarts = max_restarts
        self._runs: dict[Path, _Run] = {}
        _BACKENDS.add(self)

    @classmethod
    def from_profile(cls, profile: ClusterProfile) -> LocalBackend:
        return cls(stream=False)  # the profile has no local section

    @classmethod
    def for_run(cls, run_dir: Path) -> LocalBackend:
        return cls(stream=False)

    @property
    def ranks_have_gpus(self) -> bool | None:
        return None  # this machine's

    def check_submission(self, world_size: int) -> None:
        """Nothing beyond the run's own checks: the ranks are this machine's processes."""

    def shared_threads_per_rank(self, ranks_at_once: int) -> int:
        """This machine's cores shared out, instead of each run taking all of them."""
        return max(1, (os.cpu_count() or 1) // max(ranks_at_once, 1))

    def supervise_in_background(self, handle: RunHandle) -> None:
        """A thread waits on the run: the local backend records the outcome while it waits."""
        threading.Thread(
            target=self.wait,
            args=(handle,),
            daemon=True,
            name=f"supervise:{Path(handle.run_dir).name}",
        ).start()

    def refresh(self, run_dir: Path) -> RunRecord:
        """``state.json`` as its launcher wrote it: the launcher records every change itself.
        (A launcher that died without recording is found by :meth:`status`, on its host.)"""
        return registry.read_record(run_dir)

    def scheduler_state(self, record: RunRecord) -> str:
        return ""  # no scheduler: the launcher supervises the ranks

    # -----------------------------------------------------------------------------------------
    # Backend interface
    # -----------------------------------------------------------------------------------------
    def submit(self, spec: RunSpec) -> RunHandle:
        _check_env(spec)
        run_dir = spec.run_dir.resolve()
        layout = RunLayout(run_dir)
        layout.logs.mkdir(parents=True, exist_ok=True)
        layout.checkpoints.mkdir(parents=True, exist_ok=True)
        record = self._initial_record(spec, run_dir)
        registry.write_record(run_dir, record)
        streamer = self._make_streamer(layout)
        since = time.time()
        replicas = spec.elastic.full if spec.elastic is not None else None
        started = self._spawn_all(spec, run_dir, record, spec.world_size, replicas)
        run = _Run(spec=spec, record=record, procs=started, streamer=streamer)
        run.world, run.replicas = spec.world_size, replicas
        self._runs[run_dir] = run
        self._attempt_started(run, started, since)
        record.started_at = registry.now_iso()
        registry.write_record(run_dir, record)
        if streamer is not None:
            streamer.start()
        return RunHandle(backend=self.name, run_dir=run_dir, job_ids=tuple(record.job_ids))

    def status(self, handle: RunHandle) -> RunState:
        run = self._runs.get(Path(handle.run_dir).resolve())
        if run is not None:
            return run.record.status
        record = registry.read_record(handle.run_dir)
        if not record.status.terminal and not _launcher_alive(record):
            record.status = RunState.FAILED
            record.ended_at = registry.now_iso()
            record.failure_reason = (
                f"launcher (pid {record.launcher_pid}) exited without recording an outcome"
            )
            registry.write_record(handle.run_dir, record)
        return record.status

    def cancel(self, handle: RunHandle) -> None:
        run = self._runs.get(Path(handle.run_dir).resolve())
        if run is None:
            self._cancel_foreign(handle)
            return
        self.request_cancel(handle, signal.SIGTERM)
        self.wait(handle)

    def wait(self, handle: RunHandle, timeout: float | None = None) -> int:
        run = self._runs.get(Path(handle.run_dir).resolve())
        if run is None:
            return _wait_foreign(handle, timeout)
        if run.done.is_set():
            return _exit_code(run)
        if not run.supervising.acquire(blocking=False):
            if not run.done.wait(timeout):
                raise TimeoutError(f"run {handle.run_dir} still running after {timeout} s")
            return _exit_code(run)
        try:
            if run.done.is_set():  # another thread finished it between the checks above
                return _exit_code(run)
            return self._supervise(run, timeout)
        except TimeoutError:
            raise
        except BaseException as e:
            self._finish(run, RunState.FAILED, 1, reason=f"launcher error while supervising: {e!r}")
            raise
        finally:
            run.supervising.release()

    def request_cancel(self, handle: RunHandle, signum: int = signal.SIGTERM) -> None:
        """Ask the supervisor to cancel the run; safe to call from a signal handler.

        The teardown happens in :meth:`wait` (within ``poll_s``); the exit code is 128 + signum.
        """
        run = self._runs.get(Path(handle.run_dir).resolve())
        if run is None:
            raise ValueError(
                f"run {handle.run_dir} was not submitted by this backend; use cancel() instead"
            )
        if run.cancel_signal is None:
            run.cancel_signal = int(signum)
        run.cancel_event.set()

    # -----------------------------------------------------------------------------------------
    # Starting
    # -----------------------------------------------------------------------------------------
    def _initial_record(self, spec: RunSpec, run_dir: Path) -> RunRecord:
        previous = _previous_record(run_dir)
        if previous is not None and not previous.status.terminal and _launcher_alive(previous):
            raise RuntimeError(
                f"run {run_dir} is already {previous.status.value} under launcher pid {previous.launcher_pid}"
            )
        return RunRecord(
            backend=self.name,
            status=RunState.PENDING,
            world_size=spec.world_size,
            entry=list(spec.entry),
            launcher_pid=os.getpid(),
            launcher_create_time=psutil.Process().create_time(),
            master_addr=self.master_addr,
            master_port=free_port(self.master_addr),
            created_at=previous.created_at if previous else registry.now_iso(),
            restarts=previous.restarts if previous else [],
        )

    def _make_streamer(self, layout: RunLayout) -> LogStreamer | None:
        if self.stream is False:
            return None
        out = None if self.stream is True else self.stream
        return LogStreamer(layout.log(0), out=out)

    def _spawn_all(
        self, spec: RunSpec, run_dir: Path, record: RunRecord, world: int, replicas: int | None
    ) -> list[subprocess.Popen[bytes]]:
        started: list[subprocess.Popen[bytes]] = []
        for rank in range(world):
            try:
                started.append(self._spawn(spec, run_dir, record, rank, world, replicas))
            except (OSError, forkserver.ForkServerError) as e:
                reason = f"could not start rank {rank} with argv {spec.entry}: {e}"
                _kill_started(started, self.grace_s)
                record.status = RunState.FAILED
                record.ended_at = registry.now_iso()
                record.exit_code = 1
                record.failure_reason = reason
                registry.write_record(run_dir, record)
                raise LaunchError(reason) from e
        return started

    def _spawn(
        self,
        spec: RunSpec,
        run_dir: Path,
        record: RunRecord,
        rank: int,
        world: int,
        replicas: int | None,
    ) -> subprocess.Popen[bytes]:
        assert record.master_port is not None
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        env.update(spec.env)
        if replicas is not None:
            env.update(elastic_env(replicas))
        env.update(
            rank_env(
                rank=rank,
                world_size=world,
                local_rank=rank,
                local_world_size=world,
                master_addr=self.master_addr,
                master_port=record.master_port,
                threads_per_rank=spec.threads_per_rank,
            )
        )
        env[RUN_DIR_ENV] = str(run_dir)
        if spec.preload:
            return _fork_rank(spec, run_dir, env, RunLayout(run_dir).log(rank))
        with open(RunLayout(run_dir).log(rank), "ab") as log:
            return subprocess.Popen(
                spec.entry,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                close_fds=True,
                # Ranks die with their launcher even when it is SIGKILLed (e.g. a killed BTX
                # driver): an orphaned rank would keep training into a run nobody supervises.
                preexec_fn=procs.die_with_parent,
            )

    def _attempt_started(
        self, run: _Run, started: list[subprocess.Popen[bytes]], since: float
    ) -> None:
        run.procs, run.exits, run.exited, run.tracked = started, queue.Queue(), {}, {}
        for rank, proc in enumerate(started):
            threading.Thread(
                target=_reap, args=(proc, rank, run.exits), name=f"reap:rank{rank}", daemon=True
            ).start()
        if run.spec.hang_timeout_s is not None:
            run.watchdog = HangWatchdog(run.spec.hang_timeout_s, len(started), since)
        run.record.status = RunState.RUNNING
        run.record.pids = [p.pid for p in started]
        run.record.job_ids = [str(p.pid) for p in started]

    # -----------------------------------------------------------------------------------------
    # Supervising
    # -----------------------------------------------------------------------------------------
    def _supervise(self, run: _Run, timeout: float | None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        next_snapshot = 0.0
        while True:
            if run.cancel_event.is_set():
                return self._finish_cancelled(run)
            try:
                rank, code = run.exits.get(timeout=self.poll_s)
            except queue.Empty:
                pass
            else:
                run.exited[rank] = code
                if code != 0 and run.spec.elastic is not None:
                    if self._elastic_restart(run, rank, code):
                        continue
                if code != 0:
                    return self._finish_failed(run, rank, code)
                if len(run.exited) == run.world:
                    return self._finish(run, RunState.COMPLETED, 0)
                continue
            now = time.monotonic()
            if now >= next_snapshot:
                _track_descendants(run)
                next_snapshot = now + 1.0
                if run.spec.elastic is not None:
                    self._grow_back_when_possible(run)
                hang = run.watchdog.check(run.spec.run_dir) if run.watchdog is not None else None
                if hang is not None:
                    code = self._on_hang(run, hang)
                    if code is not None:
                        return code
                    continue
            if deadline is not None and now >= deadline:
                raise TimeoutError(f"run {run.spec.run_dir} still running after {timeout} s")

    def _on_hang(self, run: _Run, found: dict) -> int | None:
        """Stacks, record, stop, restart (None) or give up (the exit code)."""
        run_dir = run.spec.run_dir.resolve()
        dump_stacks([p.pid for p in run.procs])
        hang = record_hang(
            run_dir, found, f"local.{run.attempt}", out=sys.stderr, record=run.record
        )
        text = describe(hang)
        _track_descendants(run)
        survivors = procs.kill_run(
            run.pgids, run.tracked.values(), run.ranks_done, min(self.grace_s, 1.0)
        )
        reason = hang_signature(hang.step, hang.hang_timeout_s)
        refusal = refuse_restart(reason, hang.step, run.record.restarts, self.max_restarts)
        if survivors:
            refusal = f"{reason}; not restarting: processes still alive after SIGKILL: {sorted(p.pid for p in survivors)}"
        registry.append_to_logs(
            run_dir,
            range(run.spec.world_size),
            [
                f"moe-parallel launcher: {text}",
                refusal or "stopped the ranks; restarting from the latest checkpoint",
            ],
        )
        if refusal is not None:
            return self._finish(run, RunState.FAILED, 1, reason=f"{refusal}\n{text}")
        run.record.restarts.append(
            Restart(
                at=registry.now_iso(),
                reason=reason,
                attempt=f"local.{run.attempt}",
                kind="failed",
                step=hang.step,
            )
        )
        self._next_attempt(run, "after the hang")
        return None

    # -----------------------------------------------------------------------------------------
    # Elastic runs: hosts marked lost (mark_host_lost) shrink the run, marked back grow it
    # -----------------------------------------------------------------------------------------
    def _capacity(self, run: _Run) -> int:
        """Ranks this machine may run now: one per host of the full run, less those lost."""
        return run.spec.world_size - len(lost_hosts(run.spec.run_dir))

    def _elastic_restart(self, run: _Run, rank: int, code: int) -> bool:
        """A rank of an elastic run ended with ``code``: restart the run at the size the
        capacity allows (True), or leave the failure to the caller (False)."""
        elastic, run_dir = run.spec.elastic, run.spec.run_dir.resolve()
        assert elastic is not None and run.replicas is not None
        if code == EXIT_REQUEUE and run.grow_requested:  # stopped at a checkpoint to grow back
            self._wait_ranks_exit(run)
            target = elastic.largest_that_fits(self._capacity(run))
            cause = "the capacity came back"
            kind = "resized"
        elif lost_hosts(run_dir):
            deadline = time.monotonic() + elastic.wait_for_capacity_s
            while lost_hosts(run_dir) and time.monotonic() < deadline:
                time.sleep(self.poll_s)
            target = elastic.largest_that_fits(self._capacity(run))
            cause = f"rank {rank}'s host was lost"
            kind = "failed"
        else:
            return False
        if target is None:
            return False
        step = _heartbeat_step(run_dir)
        if kind == "failed":
            refusal = refuse_restart(cause, step, run.record.restarts, self.max_restarts)
            if refusal is not None:
                return False
        _track_descendants(run)
        procs.kill_run(run.pgids, run.tracked.values(), run.ranks_done, min(self.grace_s, 1.0))
        attempt = f"local.{run.attempt}"
        run.record.restarts.append(
            Restart(at=registry.now_iso(), reason=cause, attempt=attempt, kind=kind, step=step)
        )
        if target != run.replicas:
            record_resize(run_dir, elastic, run.replicas, target, cause, attempt, step, run.record)
        clear_grow_back(run_dir)
        run.grow_requested = False
        run.replicas, run.world = target, elastic.world(target)
        self._next_attempt(run, f"with {target} data-parallel replicas: {cause}")
        return True

    def _next_attempt(self, run: _Run, why: str) -> None:
        """Start the run's ranks again (``run.world`` of them), recorded and announced."""
        run_dir = run.spec.run_dir.resolve()
        run.attempt += 1
        run.record.master_port = free_port(self.master_addr)
        since = time.time()
        started = self._spawn_all(run.spec, run_dir, run.record, run.world, run.replicas)
        self._attempt_started(run, started, since)
        registry.write_record(run_dir, run.record)
        print(
            f"moe-parallel: restarted the run (attempt {run.attempt}) {why}",
            file=sys.stderr,
            flush=True,
        )

    def _grow_back_when_possible(self, run: _Run) -> None:
        """A shrunk run whose capacity came back is asked to stop at its next checkpoint."""
        elastic = run.spec.elastic
        assert elastic is not None and run.replicas is not None
        if not elastic.grow_back or run.grow_requested or run.replicas == elastic.full:
            return
        target = elastic.largest_that_fits(self._capacity(run))
        if target is not None and target > run.replicas:
            request_grow_back(run.spec.run_dir.resolve(), target)
            run.grow_requested = True

    def _wait_ranks_exit(self, run: _Run) -> None:
        """Every rank of the attempt stops at the same checkpoint: wait for the others."""
        deadline = time.monotonic() + self.grace_s + 60.0
        while len(run.exited) < run.world and time.monotonic() < deadline:
            try:
                rank, code = run.exits.get(timeout=self.poll_s)
            except queue.Empty:
                continue
            run.exited[rank] = code

    def _finish_failed(self, run: _Run, rank: int, code: int) -> int:
        log_tail = _tail(RunLayout(run.spec.run_dir).log(rank), self.tail_lines)
        if code < 0:
            failure = RankFailure(rank=rank, signal=_signal_name(-code), log_tail=log_tail)
            exit_code = 128 - code
        else:
            failure = RankFailure(rank=rank, exit_code=code, log_tail=log_tail)
            exit_code = code if code < 256 else 1
        return self._finish(
            run, RunState.FAILED, exit_code, failure=failure, reason=failure.describe()
        )

    def _finish_cancelled(self, run: _Run) -> int:
        signum = run.cancel_signal or signal.SIGTERM
        reason = f"cancelled: the launcher received {_signal_name(signum)}"
        return self._finish(run, RunState.CANCELLED, 128 + signum, reason=reason)

    def _finish(
        self,
        run: _Run,
        status: RunState,
        exit_code: int,
        failure: RankFailure | None = None,
        reason: str | None = None,
    ) -> int:
        _track_descendants(run)
        survivors = procs.kill_run(run.pgids, run.tracked.values(), run.ranks_done, self.grace_s)
        if survivors:
            pids = sorted(p.pid for p in survivors)
            reason = (
                reason + "\n" if reason else ""
            ) + f"processes still alive after SIGKILL: {pids}"
        _stop_streamer(run.streamer)
        record = run.record
        record.status = status
        record.exit_code = exit_code
        record.failure = failure
        record.failure_reason = reason
        record.ended_at = registry.now_iso()
        registry.write_record(run.spec.run_dir.resolve(), record)
        run.exit_code = exit_code
        run.done.set()
        return exit_code

    def _cancel_foreign(self, handle: RunHandle) -> None:
        record = registry.read_record(handle.run_dir)
        if record.status.terminal:
            return
        if not _launcher_alive(record):
            self.status(handle)  # records the lost launcher
            return
        assert record.launcher_pid is not None
        os.kill(record.launcher_pid, signal.SIGTERM)
        _wait_foreign(handle, timeout=self.grace_s + 30.0)

    def _cancel_unfinished(self) -> None:
        for run in list(self._runs.values()):
            if not run.done.is_set():
                handle = RunHandle(self.name, run.spec.run_dir.resolve())
                self.request_cancel(handle, signal.SIGTERM)
                self.wait(handle)


# ---------------------------------------------------------------------------------------------
# Convenience: run in the foreground, cancelling on SIGINT / SIGTERM / SIGHUP
# ---------------------------------------------------------------------------------------------
def run_local(spec: RunSpec, stream: bool | TextIO = True, grace_s: float = 5.0) -> int:
    """Run ``spec`` on local ranks in the foreground and return the run's exit code.

    0 when every rank succeeded; the failed rank's exit code (or 128 + signal) when one failed;
    128 + signal when the launcher was interrupted.  ``state.json`` holds the details.
    """
    backend = LocalBackend(stream=stream, grace_s=grace_s)
    with _cancel_on_signals(backend) as holder:
        handle = backend.submit(spec)
        holder.attach(handle)
        try:
            return backend.wait(handle)
        except BaseException:
            if backend.status(handle) is RunState.RUNNING:
                backend.cancel(handle)
            raise


class _SignalHolder:
    """Routes launcher signals to the run once it exists (signals before that are kept)."""

    def __init__(self, backend: LocalBackend) -> None:
        self.backend = backend
        self.handle: RunHandle | None = None
        self.pending: int | None = None

    def attach(self, handle: RunHandle) -> None:
        self.handle = handle
        if self.pending is not None:
            self.backend.request_cancel(handle, self.pending)

    def __call__(self, signum: int, frame: object) -> None:
        if self.handle is None:
            self.pending = self.pending or signum
        else:
            self.backend.request_cancel(self.handle, signum)


_CANCEL_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def _cancel_on_signals(backend: LocalBackend) -> Iterator[_SignalHolder]:
    holder = _SignalHolder(backend)
    if threading.current_thread() is not threading.main_thread():
        yield holder  # handlers can only be installed from the main thread
        return
    # A signal the launcher was told to ignore (nohup, a background job) stays ignored.
    wanted = [
        sig
        for sig in _CANCEL_SIGNALS
        if sig == signal.SIGTERM or signal.getsignal(sig) is not signal.SIG_IGN
    ]
    previous = {sig: signal.signal(sig, holder) for sig in wanted}
    try:
        yield holder
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# ---------------------------------------------------------------------------------------------
# Hosts of an elastic local run, marked lost and back (for tests and demonstrations)
# ---------------------------------------------------------------------------------------------
LOST_HOSTS_FILE = "local_lost_hosts.json"


def lost_hosts(run_dir: Path) -> list[int]:
    """The hosts of a local run marked lost (one host per rank of the full run)."""
    path = Path(run_dir) / LOST_HOSTS_FILE
    return json.loads(path.read_text()) if path.is_file() else []


def mark_host_lost(run_dir: Path, rank: int) -> None:
    """Take rank ``rank``'s host away from a local run, as a machine failure would: the host is
    marked lost, then the rank's processes are killed. An elastic run goes on with the ranks the
    remaining hosts hold; any other run fails as when a rank dies."""
    run_dir = Path(run_dir)
    lost = lost_hosts(run_dir)
    (run_dir / LOST_HOSTS_FILE).write_text(json.dumps(sorted({*lost, int(rank)})))
    pid = registry.read_record(run_dir).pids[rank]
    with contextlib.suppress(ProcessLookupError):  # it may have exited on its own meanwhile
        os.killpg(pid, signal.SIGKILL)


def mark_hosts_back(run_dir: Path) -> None:
    """Every lost host of a local run is back: an elastic run grows back at its next checkpoint."""
    (Path(run_dir) / LOST_HOSTS_FILE).unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------
def _heartbeat_step(run_dir: Path) -> int | None:
    beat = registry.read_heartbeat(run_dir)
    return int(beat["step"]) if beat else None


def _check_env(spec: RunSpec) -> None:
    owned = sorted(set(spec.env) & set(OWNED_VARS))
    if owned:
        raise ValueError(
            f"RunSpec.env sets {owned}, which the backend owns; use RunSpec.threads_per_rank "
            f"for OMP/MKL threads (owned variables: {', '.join(OWNED_VARS)})"
        )


def _fork_rank(spec: RunSpec, run_dir: Path, env: dict[str, str], log: Path) -> ForkedProcess:
    """A rank forked by this launcher's server for ``spec.preload``. The server imports the
    modules under the launcher's environment with the run's own variables (``spec.env``), the
    environment a fresh rank would import them under, less the per-rank variables."""
    server_env = {**os.environ, "PYTHONUNBUFFERED": "1", **spec.env}
    server = forkserver.server_for(
        spec.preload, server_env, RunLayout(run_dir).logs / "forkserver.log"
    )
    return server.spawn(spec.entry, env, log)


def _reap(proc: subprocess.Popen[bytes], rank: int, exits: queue.Queue[tuple[int, int]]) -> None:
    exits.put((rank, proc.wait()))


def _track_descendants(run: _Run) -> None:
    live = [p.pid for p in run.procs if p.returncode is None]
    for child in procs.descendants(live):
        run.tracked.setdefault(child.pid, child)


def _kill_started(started: list[subprocess.Popen[bytes]], grace_s: float) -> None:
    pgids = {p.pid for p in started}
    tracked = procs.descendants(pgids)
    procs.kill_run(pgids, tracked, lambda: all(p.poll() is not None for p in started), grace_s)


def _stop_streamer(streamer: LogStreamer | None) -> None:
    if streamer is None:
        return
    try:
        streamer.stop()
    except RuntimeError as e:
        print(f"warning: rank 0 output could not be streamed to stdout: {e}", file=sys.stderr)


def _tail(path: Path, lines: int) -> list[str]:
    if not path.exists():
        return [f"<no log file at {path}>"]
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 64 * 1024))
        text = f.read().decode("utf-8", errors="replace")
    return text.splitlines()[-lines:]


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _exit_code(run: _Run) -> int:
    assert run.exit_code is not None
    return run.exit_code


def _previous_record(run_dir: Path) -> RunRecord | None:
    if not RunLayout(run_dir).state.exists():
        return None
    return registry.read_record(run_dir)


def _launcher_alive(record: RunRecord) -> bool:
    if record.launcher_pid is None:
        return False
    try:
        proc = psutil.Process(record.launcher_pid)
        same = (
            record.launcher_create_time is None
            or abs(proc.create_time() - record.launcher_create_time) < 1.0
        )
        return same and not procs.is_gone(proc)
    except psutil.NoSuchProcess:
        return False


def _wait_foreign(handle: RunHandle, timeout: float | None) -> int:
    """Wait for a run another process supervises, by polling its state.json."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        record = registry.read_record(handle.run_dir)
        if record.status.terminal:
            return record.exit_code if record.exit_code is not None else 1
        if not _launcher_alive(record):
            raise RuntimeError(
                f"run {handle.run_dir} is {record.status.value} but its launcher (pid {record.launcher_pid}) is gone"
            )
        if deadline is not None and time.monotonic() >= deadline:
            raise TimeoutError(
                f"run {handle.run_dir} still {record.status.value} after {timeout} s"
            )
        time.sleep(0.2)
