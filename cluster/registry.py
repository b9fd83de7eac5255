"""Run directories: where they live, what is inside, and the run's record (``state.json``).

Layout of one run directory::

    <root>/<name>-<YYYYmmdd-HHMMSS>-<6 hex>/
        config.yaml          the resolved run config
        state.json           RunRecord: backend, status, ranks, failure, restarts, hangs, resizes
        metrics.jsonl        one JSON object per logged step
        heartbeat.json       rank 0's last finished step
        heartbeats/rank{R}.json  rank R's heartbeat (step, phase, collective), read by the watchdog
        stacks/              the ranks' Python stacks, dumped when the watchdog finds a hang
        logs/rank{R}.log     stdout + stderr of rank R
        checkpoints/

``root`` is ``$MOE_PARALLEL_RUNS`` when set, else ``./runs``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import secrets
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cluster.locks import exclusive_lock
from cluster.state import RunState

RUNS_ENV = "MOE_PARALLEL_RUNS"
DEFAULT_RUNS_ROOT = Path("runs")

CONFIG_FILE = "config.yaml"
STATE_FILE = "state.json"
METRICS_FILE = "metrics.jsonl"
HEARTBEAT_FILE = "heartbeat.json"
HEARTBEATS_DIR = "heartbeats"  # heartbeats/rank{R}.json: each rank's step, phase, collective
STACKS_DIR = "stacks"  # stacks/rank{R}.{pid}.txt: a rank's Python stacks, dumped on a hang
LOGS_DIR = "logs"
CHECKPOINTS_DIR = "checkpoints"
LOG_FILE_TEMPLATE = "rank{rank}.log"

SCHEMA_VERSION = 1

_NAME_RE = re.compile(r"[^A-Za-z0-9._-]+")
_DIR_RE = re.compile(r"-(\d{8}-\d{6})-[0-9a-f]{6}$")


# ---------------------------------------------------------------------------------------------
# Layout
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunLayout:
    """The paths inside one run directory."""

    path: Path

    @property
    def config(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def state(self) -> Path:
        return self.path / STATE_FILE

    @property
    def metrics(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def heartbeat(self) -> Path:
        """Written by the run's rank 0 after each step: ``{"step": N, "time": unix seconds}``."""
        return self.path / HEARTBEAT_FILE

    @property
    def logs(self) -> Path:
        return self.path / LOGS_DIR

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS_DIR

    def log(self, rank: int) -> Path:
        if rank < 0:
            raise ValueError(f"rank must be >= 0, got {rank}")
        return self.logs / LOG_FILE_TEMPLATE.format(rank=rank)


def runs_root(root: Path | str | None = None) -> Path:
    """``root`` if given, else ``$MOE_PARALLEL_RUNS``, else ``./runs``."""
    if root is not None:
        return Path(root)
    from_env = os.environ.get(RUNS_ENV, "")
    return Path(from_env) if from_env else DEFAULT_RUNS_ROOT


def new_run_dir(root: Path | str | None = None, name: str = "run") -> Path:
    """Create and return a fresh run directory ``<root>/<name>-<timestamp>-<suffix>``.

    The directory is created with ``exist_ok=False``, so an existing directory is never reused.
    """
    base = runs_root(root)
    base.mkdir(parents=True, exist_ok=True)
    clean = _NAME_RE.sub("-", name).strip("-.") or "run"
    for _ in range(100):
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = base / f"{clean}-{stamp}-{_suffix()}"
        try:
            path.mkdir()
        except FileExistsError:
            continue
        layout = RunLayout(path)
        layout.logs.mkdir()
        layout.checkpoints.mkdir()
        return path
    raise RuntimeError(f"could not create a new run directory under {base}: 100 names were taken")


def _suffix() -> str:
    return secrets.token_hex(3)


# ---------------------------------------------------------------------------------------------
# The record
# ---------------------------------------------------------------------------------------------
@dataclass
class RankFailure:
    """Which rank failed first, and how: an exit code or the signal that killed it."""

    rank: int
    exit_code: int | None = None
    signal: str | None = None
    log_tail: list[str] = field(default_factory=list)

    def describe(self) -> str:
        how = (
            f"was killed by signal {self.signal}"
            if self.signal
            else f"exited with code {self.exit_code}"
        )
        text = f"rank {self.rank} {how}"
        if self.log_tail:
            text += "; last lines of its log:\n" + "\n".join(self.log_tail)
        return text


@dataclass
class Restart:
    """One restart of the run (written by fault-tolerant backends).

    ``kind``: "preempted" (stopped by a signal after a checkpoint; not counted as a failure),
    "failed" (counted against max_restarts), "external" (requeued by the scheduler itself) or
    "resized" (an elastic run stopped at a checkpoint to grow back; not counted).
    ``step``: the last step the run had finished (heartbeat) when it stopped.
    """

    at: str
    reason: str
    attempt: int
    kind: str = "failed"
    step: int | None = None


@dataclass
class Hang:
    """A hang the launcher's watchdog detected (cluster/watchdog.py): when, after
    which step, and where each rank was (step, phase, collective, heartbeat age, stack file)."""

    at: str
    attempt: str
    step: int | None
    hang_timeout_s: float
    idle_s: float  # seconds without a finished step when it was detected
    ranks: list[dict] = field(default_factory=list)
    stacks: list[str] = field(default_factory=list)
    stacks_missing: list[str] = field(default_factory=list)


@dataclass
class Resize:
    """One change of an elastic run's size (cluster/elastic.py): ``kind`` "elastic_shrink" (a
    node was lost and the full size could not be placed) or "elastic_grow" (the capacity came
    back and the run restarted at a larger size from its checkpoint). ``step``: the last step the
    run had finished (heartbeat) when the change was decided."""

    at: str
    kind: str
    step: int | None
    attempt: str
    from_data_parallel: int
    to_data_parallel: int
    from_world_size: int
    to_world_size: int
    cause: str


@dataclass
class RunRecord:
    """The content of ``state.json``. Times are ISO-8601 UTC strings."""

    backend: str
    status: RunState
    world_size: int
    entry: list[str] = field(default_factory=list)
    job_ids: list[str] = field(default_factory=list)
    pids: list[int] = field(default_factory=list)
    launcher_pid: int | None = None
    launcher_create_time: float | None = None
    master_addr: str | None = None
    master_port: int | None = None
    created_at: str | None = None
    started_at: str | None = None
    ended_at: str | None = None
    exit_code: int | None = None
    failure: RankFailure | None = None
    failure_reason: str | None = None
    restarts: list[Restart] = field(default_factory=list)
    hangs: list[Hang] = field(default_factory=list)
    resizes: list[Resize] = field(default_factory=list)
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["status"] = self.status.value
        # Absent unless they happened: older readers refuse unknown keys.
        for optional in ("hangs", "resizes"):
            if not data[optional]:
                del data[optional]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunRecord:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"state.json has unknown fields {unknown}; known fields are {sorted(known)}"
            )
        missing = [k for k in ("backend", "status", "world_size") if k not in data]
        if missing:
            raise ValueError(f"state.json lacks required fields {missing}")
        values = dict(data)
        values["status"] = RunState.parse(values["status"])
        if values.get("failure") is not None:
            values["failure"] = RankFailure(**values["failure"])
        values["restarts"] = [Restart(**r) for r in values.get("restarts", [])]
        values["hangs"] = [Hang(**h) for h in values.get("hangs", [])]
        values["resizes"] = [Resize(**r) for r in values.get("resizes", [])]
        return cls(**values)


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def write_record(run_dir: Path | str, record: RunRecord) -> None:
    """Write ``state.json`` atomically: a temporary file in the same directory, then os.replace."""
    target = RunLayout(Path(run_dir)).state
    fd, tmp = tempfile.mkstemp(prefix=".state.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(record.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def record_lock(run_dir: Path | str):
    """An exclusive lock on the run's record (flock on ``.state.lock`` next to it), for a
    read-modify-write that another process (a SLURM task, moectl) may do at the same time."""
    with exclusive_lock(RunLayout(Path(run_dir)).state.with_name(".state.lock")):
        yield


def update_record(run_dir: Path | str, change: Callable[[RunRecord], None]) -> RunRecord:
    """Read ``state.json``, apply ``change`` and write it back, under :func:`record_lock`."""
    with record_lock(run_dir):
        record = read_record(run_dir)
        change(record)
        write_record(run_dir, record)
    return record


def read_record(run_dir: Path | str) -> RunRecord:
    """Read ``state.json``; errors name the file and what is wrong with it."""
    path = RunLayout(Path(run_dir)).state
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: {run_dir} was never submitted or is not a run directory"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, found {type(data).__name__}")
    try:
        return RunRecord.from_dict(data)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from e


def read_heartbeat(run_dir: Path | str) -> dict | None:
    """The last heartbeat (``step``, ``time``), or None before the first step."""
    path = RunLayout(Path(run_dir)).heartbeat
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None


def write_heartbeat(run_dir: Path | str, step: int) -> None:
    path = RunLayout(Path(run_dir)).heartbeat
    tmp = path.with_name(".heartbeat.tmp")
    tmp.write_text(json.dumps({"step": step, "time": time.time(), "pid": os.getpid()}))
    os.replace(tmp, path)


def read_rank_heartbeats(run_dir: Path | str, world_size: int) -> dict[int, dict]:
    """The ranks' last heartbeats (``heartbeats/rank{R}.json``; a rank without a file yet is
    absent)."""
    folder = Path(run_dir) / HEARTBEATS_DIR
    beats = {}
    for rank in range(world_size):
        path = folder / f"rank{rank}.json"
        try:
            text = path.read_text()
        except FileNotFoundError:
            continue
        try:
            beats[rank] = json.loads(text)
        except json.JSONDecodeError as exc:  # written atomically: a bad file is a real problem
            raise ValueError(f"heartbeat {path} is not valid JSON: {exc}") from exc
    return beats


def append_to_logs(run_dir: Path | str, ranks: Iterable[int], lines: Iterable[str]) -> None:
    """The launcher's own lines (``==== LINE``) at the end of these ranks' logs."""
    text = "".join(f"==== {line}\n" for line in lines)
    for rank in ranks:
        with open(RunLayout(Path(run_dir)).log(rank), "a") as log:
            log.write(text)


# ---------------------------------------------------------------------------------------------
# Listing
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunEntry:
    """One directory under the runs root. ``record`` is None when it has no readable state.json;
    ``error`` then says why (absent file: never submitted; or the read error)."""

    path: Path
    record: RunRecord | None
    error: str | None = None


def list_runs(root: Path | str | None = None) -> list[RunEntry]:
    """Every run directory under ``root``, oldest first (by the timestamp in the name)."""
    base = runs_root(root)
    if not base.is_dir():
        return []
    entries = [_entry(p) for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return sorted(entries, key=_sort_key)


def _entry(path: Path) -> RunEntry:
    if not RunLayout(path).state.is_file():
        return RunEntry(path, None, "no state.json: never submitted")
    try:
        return RunEntry(path, read_record(path))
    except (OSError, ValueError) as e:
        return RunEntry(path, None, str(e))


def _sort_key(entry: RunEntry) -> tuple[str, str]:
    match = _DIR_RE.search(entry.path.name)
    return (match.group(1) if match else "", entry.path.name)
