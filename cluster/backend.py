"""The executor interface every backend implements (local, SLURM, Ray).

A backend turns a :class:`RunSpec` into ``world_size`` ranks, each running ``spec.entry`` with a
torch.distributed environment (see :mod:`cluster.env`).  It knows runs and ranks, never models.

The shape follows submitit: ``submit`` returns a small handle, and ``status`` / ``wait`` /
``cancel`` take that handle.  A run's state lives on disk in ``run_dir/state.json``
(:mod:`cluster.registry`), so a run can be inspected from any process, not only the launcher:
:meth:`Backend.refresh` brings it up to date from the scheduler, :meth:`Backend.scheduler_state`
says what the scheduler calls the run's job. :mod:`cluster.backends` picks the backend, by name,
for a cluster profile, or for an existing run.
"""

from __future__ import annotations

import abc
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from cluster import registry
from cluster.elastic import ElasticSpec
from cluster.registry import RunRecord
from cluster.state import RunState

if TYPE_CHECKING:
    from cluster.profile import ClusterProfile

__all__ = ["Backend", "BackendError", "QueuedBackend", "RunHandle", "RunSpec", "RunState"]


class BackendError(RuntimeError):
    """The scheduler refused or failed a request (its own message is included)."""


@dataclass(frozen=True)
class RunSpec:
    """What to run: ``world_size`` copies of ``entry``, one per rank.

    ``entry`` is the argv of the program every rank runs, e.g.
    ``[sys.executable, "-m", "moe_parallel.train.entry", str(run_dir)]``.
    ``env`` is extra environment for every rank; it may not set the variables the backend owns
    (RANK, WORLD_SIZE, ..., OMP_NUM_THREADS: use ``threads_per_rank`` for the thread count).
    ``threads_per_rank`` is OMP/MKL threads per rank; None means cpus // ranks on the node.
    ``hang_timeout_s``: the launcher's watchdog (cluster/watchdog.py) restarts the
    run when no rank finishes a step for this long (None: no watchdog).
    ``elastic``: the sizes the run may shrink to when capacity is lost, and whether it grows
    back (cluster/elastic.py); None: a failed run restarts at ``world_size`` only.
    ``preload``: modules the local backend imports once, in a fork server that then forks
    every rank (cluster/forkserver.py), for an ``entry`` of the form ``[python, -m, MODULE,
    ...]``; only for ranks that initialise no GPU before forking. Empty: every rank is a fresh
    process. SLURM and Ray start each rank from its own task or actor and do not use it.
    """

    run_dir: Path
    world_size: int
    entry: list[str]
    env: dict[str, str] = field(default_factory=dict)
    threads_per_rank: int | None = None
    hang_timeout_s: float | None = None
    elastic: ElasticSpec | None = None
    preload: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "run_dir", Path(self.run_dir))
        object.__setattr__(self, "entry", [str(a) for a in self.entry])
        if not isinstance(self.world_size, int) or self.world_size < 1:
            raise ValueError(f"RunSpec.world_size must be an int >= 1, got {self.world_size!r}")
        if not self.entry:
            raise ValueError("RunSpec.entry is empty: give the argv of the program each rank runs")
        if self.hang_timeout_s is not None and self.hang_timeout_s <= 0:
            raise ValueError(
                f"RunSpec.hang_timeout_s must be > 0 or None, got {self.hang_timeout_s!r}"
            )
        if self.threads_per_rank is not None and self.threads_per_rank < 1:
            raise ValueError(
                f"RunSpec.threads_per_rank must be >= 1 or None, got {self.threads_per_rank!r}"
            )
        if self.elastic is not None and self.elastic.world(self.elastic.full) != self.world_size:
            raise ValueError(
                f"RunSpec.elastic: {self.elastic.full} replicas of {self.elastic.ranks_per_replica}"
                f" rank(s) is not world_size={self.world_size}"
            )
        object.__setattr__(self, "preload", tuple(self.preload))
        if self.preload and (len(self.entry) < 3 or self.entry[1] != "-m"):
            raise ValueError(
                f"RunSpec.preload needs an entry of the form [python, -m, MODULE, ...], "
                f"got {self.entry}"
            )
        for key, value in self.env.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise TypeError(f"RunSpec.env must map str to str; got {key!r}: {value!r}")


@dataclass(frozen=True)
class RunHandle:
    """What ``submit`` returns: enough to find the run again (its directory holds the rest).

    ``job_ids`` are the backend's own ids: rank pids for local, job ids for SLURM, actor ids for Ray.
    """

    backend: str
    run_dir: Path
    job_ids: tuple[str, ...] = ()

    @classmethod
    def of_run(cls, run_dir: Path | str, record: RunRecord) -> RunHandle:
        """The handle of an existing run, from its record."""
        return cls(record.backend, Path(run_dir), tuple(record.job_ids))


class Backend(abc.ABC):
    """Starts ranks, supervises them, and records the outcome in ``run_dir/state.json``."""

    name: str = "abstract"
    # Whether a failed rank is restarted inside the job (by the scheduler's side of the backend)
    # rather than by whoever started the run.
    restarts_inside_the_job: bool = False

    @classmethod
    @abc.abstractmethod
    def from_profile(cls, profile: ClusterProfile) -> Backend:
        """The backend configured by a cluster profile (its own section of it)."""

    @classmethod
    @abc.abstractmethod
    def for_run(cls, run_dir: Path) -> Backend:
        """The backend set up as the run in ``run_dir`` was submitted with (to refresh or cancel
        it from another process)."""

    @property
    @abc.abstractmethod
    def ranks_have_gpus(self) -> bool | None:
        """Whether the ranks get GPUs; None: they run on this machine, which decides."""

    @abc.abstractmethod
    def check_submission(self, world_size: int) -> None:
        """Refuse (ProfileError, BackendError) a run of ``world_size`` ranks this backend cannot
        take, before anything is created or queued."""

    def ranks_per_node_at_most(self, world_size: int) -> int | None:
        """The most ranks one node of this backend holds; None: no such limit (local ranks).
        An elastic run's model-parallel group must fit on one node (cluster/elastic.py)."""
        return None

    @abc.abstractmethod
    def shared_threads_per_rank(self, ranks_at_once: int) -> int | None:
        """CPU threads per rank while runs with ``ranks_at_once`` ranks in all go at the same
        time (BTX branches); None: each rank's own CPUs decide (see :attr:`RunSpec.threads_per_rank`)."""

    @abc.abstractmethod
    def supervise_in_background(self, handle: RunHandle) -> None:
        """Let the run go on, and its outcome be recorded, without the caller blocking in
        :meth:`wait`."""

    @abc.abstractmethod
    def refresh(self, run_dir: Path) -> RunRecord:
        """``state.json``, brought up to date from the scheduler where it knows better."""

    @abc.abstractmethod
    def scheduler_state(self, record: RunRecord) -> str:
        """What the scheduler calls the run's (last) job now; "" when there is no scheduler or
        no job yet."""

    @abc.abstractmethod
    def submit(self, spec: RunSpec) -> RunHandle:
        """Start the run's ranks and return without waiting for them."""

    @abc.abstractmethod
    def status(self, handle: RunHandle) -> RunState:
        """The run's current state."""

    @abc.abstractmethod
    def cancel(self, handle: RunHandle) -> None:
        """Stop every rank of the run and record it as cancelled (no-op on a finished run)."""

    @abc.abstractmethod
    def wait(self, handle: RunHandle, timeout: float | None = None) -> int:
        """Block until the run ends and return its exit code (0 = every rank succeeded).

        Raises TimeoutError when ``timeout`` seconds pass first; the run keeps going.
        """

    def logs(self, run_dir: Path, rank: int) -> Path:
        """Path of the log file holding rank ``rank``'s stdout and stderr."""
        return registry.RunLayout(Path(run_dir)).log(rank)


class QueuedBackend(Backend):
    """A backend whose runs are jobs of a scheduler (SLURM, Ray): the job itself writes
    ``state.json``; this side submits, cancels, and corrects the record when the scheduler
    says the job ended without writing it (:meth:`refresh`)."""

    poll_s: float = 1.0
    restarts_inside_the_job = True  # the SLURM task / Ray driver restarts from the checkpoint

    @staticmethod
    def check_env(spec: RunSpec) -> None:
        """Refuse a spec that sets what the backend sets (the rank and thread variables)."""
        from cluster.env import OWNED_VARS

        owned = sorted(set(spec.env) & set(OWNED_VARS))
        if owned:
            raise ValueError(f"RunSpec.env may not set {owned}: the backend sets them")

    def write_pending_record(self, spec: RunSpec, run_dir: Path) -> RunRecord:
        """Record the run as pending, keeping the job ids and restarts of an earlier, finished
        submission of the same run."""
        previous = finished_record(run_dir)
        record = RunRecord(
            backend=self.name,
            status=RunState.PENDING,
            world_size=spec.world_size,
            entry=list(spec.entry),
            created_at=registry.now_iso(),
            job_ids=list(previous.job_ids) if previous else [],
            restarts=list(previous.restarts) if previous else [],
        )
        registry.write_record(run_dir, record)
        return record

    @abc.abstractmethod
    def refresh(self, run_dir: Path) -> RunRecord:
        """``state.json``, corrected from the scheduler's view when they disagree."""

    @abc.abstractmethod
    def stop_jobs(self, record: RunRecord) -> None:
        """Ask the scheduler to stop the run's job(s)."""

    @abc.abstractmethod
    def job_state(self, job_id: str) -> str:
        """The scheduler's state of one job (its own words: RUNNING, SUCCEEDED, ...)."""

    def scheduler_state(self, record: RunRecord) -> str:
        return self.job_state(record.job_ids[-1]) if record.job_ids else ""

    def shared_threads_per_rank(self, ranks_at_once: int) -> int | None:
        return None  # every rank has the CPUs the profile gives it

    def supervise_in_background(self, handle: RunHandle) -> None:
        """Nothing to do: the scheduler runs the job, which records its own outcome."""

    def status(self, handle: RunHandle) -> RunState:
        return self.refresh(handle.run_dir).status

    def cancel(self, handle: RunHandle) -> None:
        run_dir = Path(handle.run_dir)
        ended_before = []

        def cancelled(record) -> None:
            if record.status.terminal:
                ended_before.append(record.status)
                return
            record.status = RunState.CANCELLED
            record.ended_at = registry.now_iso()
            record.failure_reason = "cancelled with moectl cancel"

        # Record first (under the record's lock, against a job's own write at the same moment):
        # the job reads it and then neither restarts nor requeues the run.
        record = registry.update_record(run_dir, cancelled)
        if not ended_before and record.job_ids:
            self.stop_jobs(record)

    def wait(self, handle: RunHandle, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            record = self.refresh(handle.run_dir)
            if record.status.terminal:
                return 0 if record.status is RunState.COMPLETED else (record.exit_code or 1)
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(
                    f"run {handle.run_dir} still {record.status.value} after {timeout} s"
                )
            time.sleep(self.poll_s)


def finished_record(run_dir: Path) -> RunRecord | None:
    """The record of a run being resubmitted (None for a new run); refuses one still going."""
    if not registry.RunLayout(run_dir).state.is_file():
        return None
    record = registry.read_record(run_dir)
    if not record.status.terminal:
        raise ValueError(
            f"run {run_dir} is still {record.status.value} (jobs "
            f"{', '.join(record.job_ids)}); cancel it before resubmitting"
        )
    return record
