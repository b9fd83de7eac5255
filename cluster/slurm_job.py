"""What runs inside a SLURM job: one supervisor per rank, and the decision after the ranks end.

Each SLURM task runs :class:`SlurmRankTask` (submitted through submitit). It builds the rank's
torch.distributed environment from SLURM's variables, starts the run's entry as a child process
with its output in ``logs/rank{R}.log``, forwards the stop signals to it, and writes how the
rank ended to ``slurm/attempts/<job>.<restart>/rank{R}.json``: a child killed by a signal is seen
and recorded here, which an in-process rank could not do for itself.

After ``srun`` returns, the batch script's teardown runs ``python -m cluster.slurm_job finish``,
which reads those records and decides (:func:`decide`): completed; preempted (every rank saved a
checkpoint and exited with EXIT_REQUEUE) -> requeue; failed -> requeue while restarts are left
and the run made progress since the same failure last happened; otherwise failed for good.
Requeueing keeps the job id (``scontrol requeue``), so the requeued job runs the same submitit
submission, and the entry resumes from the newest checkpoint.

An elastic run (``recovery.mode: elastic``, submitted with ``--no-kill``) that loses a node goes on
inside its allocation: the teardown starts the next attempt as a new ``srun`` step with fewer
tasks on the nodes left (:func:`next_elastic_step`, :func:`run_step`), and while that step
runs it watches the partition; once the job's full node count is free again it asks the ranks to
stop at their next checkpoint, and the job is requeued, which gives it its full allocation back.

A job with spare nodes (``slurm.spare_nodes: k``, also submitted with ``--no-kill``) holds
``nodes + k`` nodes and runs its ranks on ``nodes`` of them, the batch script's host among the
spares. When it loses a node and its own nodes that still answer SLURM hold the full size, the
teardown starts the next attempt at once as a full-size ``srun`` step on them, a spare in the lost
node's place (:func:`next_step_in_allocation`): no requeue, no wait, no shrink, in restart and
elastic mode alike; with too few left it does what a run without spares does.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path

from cluster import registry
from cluster.elastic import (
    ElasticSpec,
    clear_grow_back,
    elastic_env,
    grow_back_requested,
    record_resize,
    request_grow_back,
)
from cluster.env import EXIT_REQUEUE, RUN_DIR_ENV, rank_env
from cluster.procs import kill_group, run_supervised
from cluster.registry import RankFailure, Restart, RunLayout
from cluster.restart_policy import refuse_restart
from cluster.state import RunState
from cluster.watchdog import HangWatchdog, describe, dump_stacks, hang_signature, record_hang

FORWARDED_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)
JOB_FILE = "job.json"  # slurm/job.json: what the teardown needs (max_restarts, world size)
TAIL_LINES = 15
# Set by the teardown on the tasks of a later srun step of the allocation (an elastic run that
# lost a node): the step's number (the batch script's own srun is step 0) and its hosts, in the
# order SLURM places the tasks (block distribution: rank 0 on the first).
STEP_ENV = "MOE_PARALLEL_SLURM_STEP"
STEP_NODES_ENV = "MOE_PARALLEL_SLURM_STEP_NODES"
COMMAND_TIMEOUT_S = 30


def slurm_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "slurm"


def derive_port(job_id: int, restart: int, step: int = 0) -> int:
    """The rendezvous port, the same on every node without talking: from the job id, the
    restart count and the srun step (a requeued job keeps its id, a later step its allocation,
    and the old port may still be in TIME_WAIT)."""
    return 15000 + (job_id * 31 + restart * 7919 + step * 104729) % 30000


def attempt_name(job_id: int, restart: int, step: int = 0) -> str:
    """``JOB.RESTART``, and ``JOB.RESTART.STEP`` for a later srun step of the same allocation."""
    return f"{job_id}.{restart}" + (f".{step}" if step else "")


@dataclass(frozen=True)
class SlurmTaskEnv:
    """The variables SLURM gives each task, read once."""

    job_id: int
    restart: int
    rank: int
    local_rank: int
    world_size: int
    nodes: int
    hostnames: tuple[str, ...]
    cpus_per_task: int | None
    step: int = 0

    @classmethod
    def from_environ(cls, env=os.environ) -> SlurmTaskEnv:
        missing = [
            v
            for v in (
                "SLURM_JOB_ID",
                "SLURM_PROCID",
                "SLURM_LOCALID",
                "SLURM_NTASKS",
                "SLURM_JOB_NUM_NODES",
                "SLURM_JOB_NODELIST",
            )
            if v not in env
        ]
        if missing:
            raise RuntimeError(f"not inside a SLURM task: {', '.join(missing)} not set")
        cpus = env.get("SLURM_CPUS_PER_TASK")
        hostnames = _step_hostnames(env)
        return cls(
            job_id=int(env["SLURM_JOB_ID"]),
            restart=int(env.get("SLURM_RESTART_COUNT", "0") or 0),
            rank=int(env["SLURM_PROCID"]),
            local_rank=int(env["SLURM_LOCALID"]),
            # The step's tasks: a later step of an elastic run has fewer than the job, and a job
            # with spare nodes runs its steps on some of its nodes.
            world_size=int(env.get("SLURM_STEP_NUM_TASKS") or env["SLURM_NTASKS"]),
            nodes=len(hostnames)
            if STEP_NODES_ENV in env
            else int(env.get("SLURM_STEP_NUM_NODES") or env["SLURM_JOB_NUM_NODES"]),
            hostnames=hostnames,
            cpus_per_task=int(cpus) if cpus else None,
            step=int(env.get(STEP_ENV, "0") or 0),
        )

    @property
    def attempt(self) -> str:
        return attempt_name(self.job_id, self.restart, self.step)

    @property
    def ranks_per_node(self) -> int:
        return self.world_size // self.nodes


def _step_hostnames(env) -> tuple[str, ...]:
    """The hosts of this task's step: the job's, or those the teardown gave a later step."""
    if env.get(STEP_NODES_ENV):
        return tuple(env[STEP_NODES_ENV].split(","))
    step_nodes = env.get("SLURM_STEP_NODELIST")
    if step_nodes and step_nodes != env.get("SLURM_JOB_NODELIST"):  # spares: some of the job's
        return hostnames(step_nodes)
    import submitit

    return tuple(submitit.JobEnvironment().hostnames)


def attempt_dir(run_dir: Path, attempt: str) -> Path:
    return slurm_dir(run_dir) / "attempts" / attempt


# ---------------------------------------------------------------------------------------------
# One rank
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SlurmRankTask:
    """The callable submitit runs on every task of the job (it must stay picklable)."""

    run_dir: str
    entry: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)
    threads_per_rank: int | None = None
    job_python: bool = False  # run entry[1:] with the task's interpreter (the profile's python)
    hang_timeout_s: float | None = None  # the hang watchdog (cluster/watchdog.py)

    def __call__(self) -> int:
        task = SlurmTaskEnv.from_environ()
        run_dir = Path(self.run_dir)
        if task.rank == 0:
            _mark_running(run_dir, task)
        elif _cancelled(run_dir):
            return 0
        guard = TaskHangGuard(run_dir, task, self.hang_timeout_s) if self.hang_timeout_s else None
        code = self._run_rank(run_dir, task, guard)
        _write_rank_record(run_dir, task, code, guard.signature if guard else None)
        if code in (0, EXIT_REQUEUE):
            return code
        # Non-zero exit: srun's --kill-on-bad-exit then stops every other rank at once.
        raise SystemExit(code if code > 0 else 128 - code)

    def _run_rank(self, run_dir: Path, task: SlurmTaskEnv, guard: TaskHangGuard | None) -> int:
        env = dict(os.environ)
        env.update(self.env)
        env.update(
            rank_env(
                rank=task.rank,
                world_size=task.world_size,
                local_rank=task.local_rank,
                local_world_size=task.ranks_per_node,
                master_addr=task.hostnames[0],
                master_port=derive_port(task.job_id, task.restart, task.step),
                threads_per_rank=self.threads_per_rank or task.cpus_per_task,
            )
        )
        env[RUN_DIR_ENV] = str(run_dir)
        argv = [sys.executable, *self.entry[1:]] if self.job_python else list(self.entry)
        header = (
            f"SLURM job {task.job_id} restart {task.restart} rank {task.rank} on "
            f"{socket.gethostname()} at {registry.now_iso()}"
        )
        return run_supervised(
            argv,
            env,
            RunLayout(run_dir).log(task.rank),
            header,
            forward=FORWARDED_SIGNALS,
            poll=guard.poll if guard else None,
        )


class TaskHangGuard:
    """The hang watchdog of one SLURM task (every task runs one on the shared run directory).

    When no rank finishes a step for ``hang_timeout_s``, each task makes its own rank dump its
    stacks; rank 0's task records the hang (every rank's stacks) in the state and its log; the
    other tasks wait for that record (bounded), then each stops its rank. The rank records carry
    the hang's signature, so the teardown's restart decision names the hang and the restart
    policy refuses the same hang at the same step twice."""

    RECORD_WAIT_S = 30.0

    def __init__(self, run_dir: Path, task: SlurmTaskEnv, hang_timeout_s: float) -> None:
        self.run_dir, self.task = run_dir, task
        # Heartbeats older than this task are an earlier attempt's (same host clock as its rank).
        self.watchdog = HangWatchdog(hang_timeout_s, task.world_size, since=time.time())
        self.signature: str | None = None

    def poll(self, child: subprocess.Popen) -> None:
        if self.signature is not None:
            return
        found = self.watchdog.check(self.run_dir)
        if found is None:
            return
        self.signature = hang_signature(found["step"], found["hang_timeout_s"])
        dump_stacks([child.pid])
        if self.task.rank == 0:
            hang = record_hang(self.run_dir, found, self.task.attempt)
            registry.append_to_logs(
                self.run_dir, [0], [f"moe-parallel SLURM task: {describe(hang)}"]
            )
        else:
            self._wait_for_record(found["at"])
        kill_group(child.pid)

    def _wait_for_record(self, since_iso: str) -> None:
        deadline = time.monotonic() + self.RECORD_WAIT_S
        while time.monotonic() < deadline:
            if any(
                h.attempt == self.task.attempt for h in registry.read_record(self.run_dir).hangs
            ):
                return
            time.sleep(0.5)


def _mark_running(run_dir: Path, task: SlurmTaskEnv) -> None:
    registry.update_record(run_dir, lambda record: _running(record, run_dir, task))


def _running(record: registry.RunRecord, run_dir: Path, task: SlurmTaskEnv) -> None:
    if str(task.job_id) not in record.job_ids:
        record.job_ids.append(str(task.job_id))
    # Each requeue the teardown decided is one restart number with recorded restarts (a later
    # srun step of the same allocation keeps its number).
    recorded = len(
        {_restart_number(r.attempt) for r in record.restarts if _of_job(r.attempt, task.job_id)}
    )
    if task.step == 0 and task.restart > recorded:
        # Requeued by SLURM itself (node failure, scontrol requeue, preemption by the scheduler).
        record.restarts.append(
            Restart(
                at=registry.now_iso(),
                attempt=task.attempt,
                kind="external",
                reason="requeued by SLURM (scontrol requeue, node failure or scheduler preemption)",
                step=_last_step(run_dir),
            )
        )
    record.status = RunState.RUNNING
    record.started_at = registry.now_iso()
    record.master_addr = task.hostnames[0]
    record.master_port = derive_port(task.job_id, task.restart, task.step)
    _record_size(record, run_dir, task)


def _of_job(attempt: object, job_id: int) -> bool:
    return bool(attempt) and str(attempt).startswith(f"{job_id}.")


def _restart_number(attempt: object) -> int:
    return int(str(attempt).split(".")[1])


def _record_size(record: registry.RunRecord, run_dir: Path, task: SlurmTaskEnv) -> None:
    """An elastic run's attempt that runs at another size than the one before: the change goes to
    ``resizes``, with the cause of the last restart (a lost node; the grow-back requeue)."""
    elastic = ElasticSpec.from_dict(read_job(run_dir).get("elastic"))
    if elastic is None:
        return
    replicas = task.world_size // elastic.ranks_per_replica
    before = record.resizes[-1].to_data_parallel if record.resizes else elastic.full
    if replicas != before:
        cause = record.restarts[-1].reason if record.restarts else "started at another size"
        step = _last_step(run_dir)
        record_resize(run_dir, elastic, before, replicas, cause, task.attempt, step, record)


def read_job(run_dir: Path) -> dict:
    """``slurm/job.json``: what the backend wrote for the job's tasks and teardown."""
    return json.loads((slurm_dir(run_dir) / JOB_FILE).read_text())


def _cancelled(run_dir: Path) -> bool:
    return registry.read_record(run_dir).status is RunState.CANCELLED


def _write_rank_record(
    run_dir: Path, task: SlurmTaskEnv, code: int, hang: str | None = None
) -> None:
    folder = attempt_dir(run_dir, task.attempt)
    folder.mkdir(parents=True, exist_ok=True)
    data = {
        "rank": task.rank,
        "host": socket.gethostname(),
        "exit_code": code if code >= 0 else None,
        "signal": signal.Signals(-code).name if code < 0 else None,
        "ended": time.time(),
        "hang": hang,
    }
    tmp = folder / f".rank{task.rank}.json.tmp"
    tmp.write_text(json.dumps(data))
    os.replace(tmp, folder / f"rank{task.rank}.json")


def _last_step(run_dir: Path) -> int | None:
    beat = registry.read_heartbeat(run_dir)
    return int(beat["step"]) if beat else None


# ---------------------------------------------------------------------------------------------
# After srun: what happened, and what to do
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Attempt:
    """One attempt: a srun step of the job's allocation. ``step`` 0 is the batch script's own
    srun; an elastic run that lost a node goes on in later steps, on ``nodes``, with ``replicas``
    data-parallel replicas (None: the configured size)."""

    job_id: int
    restart: int
    world_size: int
    step: int = 0
    nodes: tuple[str, ...] = ()
    replicas: int | None = None

    @property
    def name(self) -> str:
        return attempt_name(self.job_id, self.restart, self.step)


@dataclass(frozen=True)
class Decision:
    status: RunState  # COMPLETED, REQUEUED, FAILED, or RUNNING (``next`` runs in the allocation)
    kind: str  # completed | preempted | resized | failed | gave_up
    reason: str
    failure: RankFailure | None = None
    next: Attempt | None = None


def decide(
    ranks: dict[int, dict],
    world_size: int,
    restarts: list[Restart],
    max_restarts: int,
    step: int | None,
    logs: Path | None = None,
    grow_back: bool = False,
    lost_nodes: tuple[str, ...] = (),
) -> Decision:
    """The outcome of one attempt from its rank records (a pure function of what is on disk).
    ``grow_back``: the ranks were asked to stop at a checkpoint to grow back; ``lost_nodes``:
    nodes of the attempt SLURM no longer hears from."""
    codes = {r: ranks[r].get("exit_code") for r in ranks}
    if len(ranks) == world_size and all(c == 0 for c in codes.values()):
        return Decision(RunState.COMPLETED, "completed", "every rank finished")
    if len(ranks) == world_size and all(c in (0, EXIT_REQUEUE) for c in codes.values()):
        if grow_back:
            return Decision(
                RunState.REQUEUED,
                "resized",
                f"stopped at the checkpoint of step {step} to grow back: the capacity came back",
            )
        return Decision(
            RunState.REQUEUED,
            "preempted",
            f"stopped by a signal after step {step}, checkpoint saved",
        )
    failure = _first_failure(ranks, world_size, logs)
    hung = [r["hang"] for r in ranks.values() if r.get("hang")]
    # A hang stopped by the tasks' watchdog: the ranks' exits are its consequence, not its cause.
    # So is a lost node for the other ranks' errors.
    if hung:
        signature = hung[0]
    elif lost_nodes:
        signature = _lost_signature(ranks, world_size, lost_nodes)
    else:
        signature = _signature(failure)
    refusal = refuse_restart(signature, step, restarts, max_restarts)
    if refusal is not None:
        return Decision(RunState.FAILED, "gave_up", refusal, failure)
    return Decision(RunState.REQUEUED, "failed", signature, failure)


def _lost_signature(ranks: dict[int, dict], world_size: int, lost_nodes: tuple[str, ...]) -> str:
    missing = sorted(set(range(world_size)) - set(ranks))
    with_it = f"; rank(s) {', '.join(map(str, missing))} ended with it" if missing else ""
    return f"node {', '.join(lost_nodes)} was lost (SLURM no longer hears from it){with_it}"


def _first_failure(ranks: dict[int, dict], world_size: int, logs: Path | None) -> RankFailure:
    """The rank that failed first: the earliest record with a failure, else a missing record."""
    bad = sorted(
        (r for r in ranks.values() if r.get("exit_code") not in (0, EXIT_REQUEUE)),
        key=lambda r: r["ended"],
    )
    if bad:
        first = bad[0]
        return RankFailure(
            rank=first["rank"],
            exit_code=first.get("exit_code"),
            signal=first.get("signal"),
            log_tail=_tail(logs, first["rank"]),
        )
    missing = sorted(set(range(world_size)) - set(ranks))
    rank = missing[0] if missing else 0
    return RankFailure(rank=rank, signal="lost", log_tail=_tail(logs, rank))


def _signature(failure: RankFailure) -> str:
    if failure.signal == "lost":
        return f"rank {failure.rank} ended without a record (its node or task was lost)"
    return failure.describe().split(";")[0]


def _tail(logs: Path | None, rank: int) -> list[str]:
    if logs is None:
        return []
    path = logs / f"rank{rank}.log"
    if not path.is_file():
        return []
    return path.read_text(errors="replace").splitlines()[-TAIL_LINES:]


def finish(run_dir: Path, srun_exit: int) -> Decision | None:
    """The teardown of the batch script: record each attempt's outcome; run an elastic run's
    next attempt in the allocation when it lost a node; requeue when decided."""
    job = read_job(run_dir)
    attempt = Attempt(
        int(os.environ["SLURM_JOB_ID"]),
        int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
        int(job["world_size"]),
        nodes=first_step_nodes(job, os.environ["SLURM_JOB_NODELIST"]),
    )
    lost_here: tuple[str, ...] = ()  # the nodes this allocation lost
    while True:
        ranks = _rank_records(attempt_dir(run_dir, attempt.name))
        lost, going_on = next_step_in_allocation(job, attempt, ranks)
        lost_here += lost
        decision = _record_outcome(run_dir, job, attempt, ranks, srun_exit, lost, going_on)
        if decision is None:
            return None
        print(
            f"moe-parallel: attempt {attempt.name}: {decision.kind}: {decision.reason}", flush=True
        )
        if decision.next is None:
            break
        attempt = decision.next
        srun_exit = run_step(run_dir, job, attempt)
    clear_grow_back(run_dir)  # done with: the next attempt runs at its full size
    if decision.status is RunState.REQUEUED:
        let_queued_signals_pass(lost_here)
        _requeue(run_dir, attempt.job_id)
    return decision


def _record_outcome(
    run_dir: Path,
    job: dict,
    attempt: Attempt,
    ranks: dict[int, dict],
    srun_exit: int,
    lost: tuple[str, ...],
    going_on: Attempt | None,
) -> Decision | None:
    """Decide and write the attempt's outcome; None when the run was cancelled meanwhile."""
    step = _last_step(run_dir)
    # Decided and written under the record's lock: a `moectl cancel` in between must not be
    # overwritten by a requeue.
    with registry.record_lock(run_dir):
        record = registry.read_record(run_dir)
        if record.status is RunState.CANCELLED:
            return None
        decision = decide(
            ranks,
            attempt.world_size,
            record.restarts,
            job["max_restarts"],
            step,
            RunLayout(run_dir).logs,
            grow_back=grow_back_requested(run_dir),
            lost_nodes=lost,
        )
        if going_on is not None and decision.kind == "failed":
            decision = replace(decision, status=RunState.RUNNING, next=going_on)
        record.status = decision.status
        if decision.status in (RunState.REQUEUED, RunState.RUNNING):
            record.restarts.append(
                Restart(
                    at=registry.now_iso(),
                    reason=decision.reason,
                    attempt=attempt.name,
                    kind=decision.kind,
                    step=step,
                )
            )
        else:
            record.ended_at = registry.now_iso()
            record.exit_code = 0 if decision.status is RunState.COMPLETED else (srun_exit or 1)
            record.failure = decision.failure
            record.failure_reason = (
                None if decision.status is RunState.COMPLETED else decision.reason
            )
        registry.write_record(run_dir, record)
    return decision


def _rank_records(folder: Path) -> dict[int, dict]:
    out = {}
    for path in sorted(folder.glob("rank*.json")):
        data = json.loads(path.read_text())
        out[int(data["rank"])] = data
    return out


def _requeue(run_dir: Path, job_id: int) -> None:
    done = subprocess.run(
        ["scontrol", "requeue", str(job_id)], capture_output=True, text=True, timeout=60
    )
    if done.returncode != 0:
        reason = (
            f"wanted to requeue job {job_id} but scontrol requeue failed: "
            f"{done.stderr.strip()}; resubmit with `moectl submit --resume {run_dir}`"
        )

        def failed(record) -> None:
            record.status = RunState.FAILED
            record.ended_at = registry.now_iso()
            record.failure_reason = reason

        registry.update_record(run_dir, failed)
        raise RuntimeError(reason)


# ---------------------------------------------------------------------------------------------
# Elastic runs: a lost node, a new srun step on the nodes left, grow back through a requeue
# ---------------------------------------------------------------------------------------------
GROW_CHECK_S = 5.0  # how often a shrunk step looks whether the job's full node count is free
# sinfo states (%T, without flags) of a node that answers SLURM and can run a step.
USABLE_STATES = ("idle", "mixed", "allocated", "completing", "planned", "reserved")
# SlurmdTimeout when `scontrol show config` does not say (SLURM's default).
DEFAULT_SLURMD_TIMEOUT_S = 300
# SLURM's retry interval for an undelivered message (RPC_RETRY_INTERVAL, 60 s), and a margin.
QUEUED_SIGNAL_S = 75.0


@dataclass(frozen=True)
class Capacity:
    """Nodes an elastic job could run on now: its own that answer SLURM (in SLURM's order), and
    the idle nodes of its partition."""

    own: tuple[str, ...]
    idle: tuple[str, ...]


def spare_nodes(job: dict) -> int:
    return int(job["profile"].get("spare_nodes", 0))


def first_step_nodes(job: dict, nodelist: str) -> tuple[str, ...]:
    """The nodes of the batch script's own srun: all the job's, or with spare nodes the
    ``nodes`` after the first ``spare_nodes`` (``srun --relative``: the batch host, the
    allocation's first node, stays a spare). Only runs that may go on in their allocation ask."""
    if not job.get("elastic") and not spare_nodes(job):
        return ()
    spares = spare_nodes(job)
    return hostnames(nodelist)[spares : spares + int(job["profile"]["nodes"])]


def next_step_in_allocation(
    job: dict, attempt: Attempt, ranks: dict[int, dict]
) -> tuple[tuple[str, ...], Attempt | None]:
    """(the attempt's nodes SLURM lost, the next attempt as a srun step of the allocation) for a
    run with spare nodes or elastic recovery whose attempt failed having lost a node (or, elastic,
    running shrunk already): at the full size on the job's nodes that answer, a spare in the lost
    node's place, when they are enough; else an elastic run shrinks
    (:func:`next_elastic_step`). ``((), None)``: requeued as in any run."""
    elastic = ElasticSpec.from_dict(job.get("elastic"))
    if (elastic is None and not spare_nodes(job)) or _stopped_cleanly(ranks, attempt.world_size):
        return (), None
    lost = _lost_nodes(attempt, ranks)
    if not lost and attempt.world_size == int(job["world_size"]):
        return (), None
    if lost and spare_nodes(job):
        going_on = full_step_on_spares(job, attempt)
        if going_on is not None or elastic is None:
            return lost, going_on
    return lost, next_elastic_step(job, attempt, elastic)


def full_step_on_spares(job: dict, attempt: Attempt) -> Attempt | None:
    """The next attempt at the full size on the job's own nodes that answer SLURM (the batch
    host last: losing it ends the job); None when they are too few."""
    capacity = job_capacity(attempt.job_id)
    nodes = int(job["profile"]["nodes"])
    if capacity is None or len(capacity.own) < nodes:
        return None
    here = socket.gethostname()
    own = tuple(sorted(capacity.own, key=lambda node: node == here))  # stable: else SLURM order
    elastic = ElasticSpec.from_dict(job.get("elastic"))
    replicas = elastic.full if elastic is not None else None
    world = int(job["world_size"])
    return Attempt(attempt.job_id, attempt.restart, world, attempt.step + 1, own[:nodes], replicas)


def next_elastic_step(job: dict, attempt: Attempt, elastic: ElasticSpec) -> Attempt | None:
    """A shrunk attempt on the job's nodes left; None when the full node count is usable again
    within ``wait_for_capacity_s`` (then requeued) or not even the smallest size fits."""
    capacity = _wait_for_capacity(attempt.job_id, int(job["profile"]["nodes"]), elastic)
    if capacity is None or len(capacity.own) + len(capacity.idle) >= job["profile"]["nodes"]:
        return None
    shape = step_shape(elastic, len(capacity.own), int(job["ranks_per_node"]))
    if shape is None:
        return None  # not even the smallest size fits: requeued, it waits in the queue
    replicas, nodes = shape
    return Attempt(
        attempt.job_id,
        attempt.restart,
        elastic.world(replicas),
        attempt.step + 1,
        capacity.own[:nodes],
        replicas,
    )


def step_shape(elastic: ElasticSpec, nodes: int, ranks_per_node: int) -> tuple[int, int] | None:
    """(replicas, nodes used) of the largest allowed size that ``nodes`` nodes of at most
    ``ranks_per_node`` ranks hold with as many ranks on every node used; None if none does."""
    for replicas in elastic.replica_counts:
        world = elastic.world(replicas)
        for used in range(math.ceil(world / ranks_per_node), nodes + 1):
            if world % used == 0:
                return replicas, used
    return None


def _stopped_cleanly(ranks: dict[int, dict], world_size: int) -> bool:
    codes = [r.get("exit_code") for r in ranks.values()]
    return len(ranks) == world_size and all(c in (0, EXIT_REQUEUE) for c in codes)


def _lost_nodes(attempt: Attempt, ranks: dict[int, dict]) -> tuple[str, ...]:
    """The attempt's nodes SLURM calls unusable. A rank without a record may have died with its
    node before SLURM noticed (it pings every SlurmdTimeout/3): then wait for SLURM's word, at
    most SlurmdTimeout."""
    wait_s = slurmd_timeout_s() if len(ranks) < attempt.world_size else 0.0
    deadline = time.monotonic() + wait_s
    while True:
        states = node_states(["-n", ",".join(attempt.nodes)])
        lost = tuple(n for n in attempt.nodes if states is not None and not usable(states.get(n)))
        if lost or time.monotonic() >= deadline:
            return lost
        time.sleep(2.0)


def _wait_for_capacity(job_id: int, full_nodes: int, elastic: ElasticSpec) -> Capacity | None:
    """The job's capacity once its full node count is usable, or when ``wait_for_capacity_s``
    has passed (None: SLURM did not answer)."""
    deadline = time.monotonic() + elastic.wait_for_capacity_s
    while True:
        capacity = job_capacity(job_id)
        enough = capacity is not None and len(capacity.own) + len(capacity.idle) >= full_nodes
        if enough or time.monotonic() >= deadline:
            return capacity
        time.sleep(2.0)


def run_step(run_dir: Path, job: dict, attempt: Attempt) -> int:
    """Run ``attempt`` as a new srun step of the allocation; while it runs, ask its ranks to
    grow back once the job's full node count is free again. Returns srun's exit status.
    ``attempt.replicas`` None: a run without elastic recovery, at its size (spare nodes)."""
    clear_grow_back(run_dir)
    env = {
        **os.environ,
        **(elastic_env(attempt.replicas) if attempt.replicas is not None else {}),
        STEP_ENV: str(attempt.step),
        STEP_NODES_ENV: ",".join(attempt.nodes),
    }
    size = "" if attempt.replicas is None else f"{attempt.replicas} data-parallel replica(s), "
    print(
        f"moe-parallel: attempt {attempt.name}: {size}"
        f"{attempt.world_size} rank(s) on {', '.join(attempt.nodes)}",
        flush=True,
    )
    step = subprocess.Popen(step_command(job, attempt, submitit_dir(run_dir)), env=env)
    while True:
        try:
            return step.wait(timeout=GROW_CHECK_S)
        except subprocess.TimeoutExpired:
            _grow_back_when_possible(run_dir, job, attempt)


def submitit_dir(run_dir: Path) -> Path:
    """submitit's folder of the job: the pickled task every srun step runs."""
    return slurm_dir(run_dir) / "submitit"


def step_command(job: dict, attempt: Attempt, folder: Path) -> list[str]:
    """The srun line of a later step: the batch script's own (submitit's runner of the pickled
    task), with the step's shape. Its sizes are given, not inherited: the batch script's
    SLURM_NTASKS and SLURM_NTASKS_PER_NODE would otherwise set them."""
    python = job["profile"].get("python")
    return [
        "srun",
        "--unbuffered",
        "--output",
        str(folder / "%j_%t_log.out"),
        "--open-mode=append",
        "--kill-on-bad-exit=1",
        # The failed step stays "running" while its lost node is down and keeps its CPUs on the
        # nodes left (measured, SLURM 22.05): without --overlap this step would wait for them.
        "--overlap",
        f"--nodes={len(attempt.nodes)}",
        f"--ntasks={attempt.world_size}",
        f"--ntasks-per-node={attempt.world_size // len(attempt.nodes)}",
        f"--nodelist={','.join(attempt.nodes)}",
        *(shlex.split(python) if python else [sys.executable]),
        "-u",
        "-m",
        "submitit.core._submit",
        str(folder),
    ]


def _grow_back_when_possible(run_dir: Path, job: dict, attempt: Attempt) -> None:
    """A shrunk attempt asks its ranks to stop at their next checkpoint once the job's full
    node count is free again; the teardown then requeues the job, which gets all of them."""
    elastic = ElasticSpec.from_dict(job.get("elastic"))
    if elastic is None or not elastic.grow_back or attempt.replicas == elastic.full:
        return
    if grow_back_requested(run_dir):
        return
    capacity = job_capacity(attempt.job_id)
    if capacity is not None and len(capacity.own) + len(capacity.idle) >= job["profile"]["nodes"]:
        request_grow_back(run_dir, elastic.full)
        print(
            f"moe-parallel: {job['profile']['nodes']} node(s) free again: growing back to "
            f"{elastic.full} replicas at the next checkpoint (through a requeue)",
            flush=True,
        )


def let_queued_signals_pass(nodes: tuple[str, ...]) -> None:
    """Before a requeue, wait until each node the allocation lost that is back has been back for
    :data:`QUEUED_SIGNAL_S`. SLURM retries every 60 s a signal it could not deliver (srun's
    --kill-on-bad-exit to the tasks of the lost node) and delivers it once the node answers; a
    requeued job reuses the job and step ids, so the signal would stop its new step there
    (measured: SIGTERM 9 s into the requeued attempt, its node back for 35 s)."""
    for node in nodes:
        started = slurmd_start(node)
        wait_s = 0.0 if started is None else QUEUED_SIGNAL_S - _age_s(started)
        if wait_s > 0:
            print(
                f"moe-parallel: waiting {wait_s:.0f} s before the requeue: {node} came back "
                "and may still receive signals SLURM queued for the job's old steps",
                flush=True,
            )
            time.sleep(wait_s)


def slurmd_start(node: str) -> datetime | None:
    """When the node's slurmd started (SLURM's local time); None when SLURM does not say."""
    out = _query(["scontrol", "show", "node", "-o", node]) or ""
    for item in out.split():
        key, _, value = item.partition("=")
        if key == "SlurmdStartTime":
            try:
                return datetime.fromisoformat(value)
            except ValueError:
                return None  # "None" or "Unknown": never started
    return None


def _age_s(started: datetime) -> float:
    return (datetime.now() - started).total_seconds()


def job_capacity(job_id: int) -> Capacity | None:
    """What the job could run on now (None: SLURM did not answer)."""
    fields = _query(["scontrol", "show", "job", "-o", str(job_id)])
    if fields is None:
        return None
    info = dict(item.split("=", 1) for item in fields.split() if "=" in item)
    states = node_states(["-p", info.get("Partition", "")])
    own = hostnames(info.get("NodeList", ""))
    if states is None:
        return None
    return Capacity(
        own=tuple(n for n in own if usable(states.get(n))),
        idle=tuple(n for n, state in states.items() if state == "idle" and n not in own),
    )


def node_states(selection: list[str]) -> dict[str, str] | None:
    """sinfo's state of each node of ``selection`` (``-n NODES`` or ``-p PARTITION``);
    None when sinfo fails."""
    out = _query(["sinfo", "-h", "-N", *selection, "-o", "%N %T"])
    return None if out is None else parse_node_states(out)


def parse_node_states(out: str) -> dict[str, str]:
    """``sinfo -N -o '%N %T'`` as {node: state} (a node in two partitions is listed twice)."""
    return dict(line.split()[:2] for line in out.splitlines() if len(line.split()) >= 2)


def usable(state: str | None) -> bool:
    """Whether a node in this sinfo state can run a step: it answers SLURM (no "*") and is
    neither down, drained nor failing."""
    if not state or "*" in state:
        return False
    return state.rstrip("~#!%$@^-+").lower() in USABLE_STATES


def hostnames(nodelist: str) -> tuple[str, ...]:
    """SLURM's node list (``n[1-2]``) as host names, in SLURM's order."""
    if not nodelist or nodelist == "(null)":
        return ()
    out = _query(["scontrol", "show", "hostnames", nodelist])
    if out is None:
        raise RuntimeError(f"scontrol show hostnames {nodelist} failed: is SLURM on PATH?")
    return tuple(out.split())


def slurmd_timeout_s() -> float:
    """SlurmdTimeout: after this long without an answer SLURM sets a node down."""
    out = _query(["scontrol", "show", "config"]) or ""
    for line in out.splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "SlurmdTimeout" and value.split():
            return float(value.split()[0])
    return DEFAULT_SLURMD_TIMEOUT_S


def _query(args: list[str]) -> str | None:
    """A SLURM command's output; None when it fails (the caller then falls back)."""
    try:
        done = subprocess.run(
            args, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.slurm_job")
    parser.add_argument("action", choices=["finish"])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("srun_exit", type=int)
    args = parser.parse_args(argv)
    finish(args.run_dir, args.srun_exit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
