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
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from cluster import registry
from cluster.env import EXIT_REQUEUE, RUN_DIR_ENV, rank_env
from cluster.procs import kill_group, run_supervised
from cluster.registry import RankFailure, Restart, RunLayout
from cluster.restart_policy import refuse_restart
from cluster.state import RunState
from cluster.watchdog import HangWatchdog, describe, dump_stacks, hang_signature, record_hang

FORWARDED_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)
JOB_FILE = "job.json"  # slurm/job.json: what the teardown needs (max_restarts, world size)
TAIL_LINES = 15


def slurm_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "slurm"


def derive_port(job_id: int, restart: int) -> int:
    """The rendezvous port, the same on every node without talking: from the job id and the
    restart count (a requeued job keeps its id, and its old port may still be in TIME_WAIT)."""
    return 15000 + (job_id * 31 + restart * 7919) % 30000


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

    @classmethod
    def from_environ(cls, env=os.environ) -> SlurmTaskEnv:
        import submitit

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
        return cls(
            job_id=int(env["SLURM_JOB_ID"]),
            restart=int(env.get("SLURM_RESTART_COUNT", "0") or 0),
            rank=int(env["SLURM_PROCID"]),
            local_rank=int(env["SLURM_LOCALID"]),
            world_size=int(env["SLURM_NTASKS"]),
            nodes=int(env["SLURM_JOB_NUM_NODES"]),
            hostnames=tuple(submitit.JobEnvironment().hostnames),
            cpus_per_task=int(cpus) if cpus else None,
        )

    @property
    def attempt(self) -> str:
        return f"{self.job_id}.{self.restart}"

    @property
    def ranks_per_node(self) -> int:
        return self.world_size // self.nodes


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
                master_port=derive_port(task.job_id, task.restart),
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
    recorded = sum(
        1 for r in record.restarts if r.attempt and str(r.attempt).startswith(f"{task.job_id}.")
    )
    if task.restart > recorded:
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
    record.master_port = derive_port(task.job_id, task.restart)


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
class Decision:
    status: RunState  # COMPLETED, REQUEUED or FAILED
    kind: str  # completed | preempted | failed | gave_up
    reason: str
    failure: RankFailure | None = None


def decide(
    ranks: dict[int, dict],
    world_size: int,
    restarts: list[Restart],
    max_restarts: int,
    step: int | None,
    logs: Path | None = None,
) -> Decision:
    """The outcome of one attempt from its rank records (a pure function of what is on disk)."""
    codes = {r: ranks[r].get("exit_code") for r in ranks}
    if len(ranks) == world_size and all(c == 0 for c in codes.values()):
        return Decision(RunState.COMPLETED, "completed", "every rank finished")
    if len(ranks) == world_size and all(c in (0, EXIT_REQUEUE) for c in codes.values()):
        return Decision(
            RunState.REQUEUED,
            "preempted",
            f"stopped by a signal after step {step}, checkpoint saved",
        )
    failure = _first_failure(ranks, world_size, logs)
    hung = [r["hang"] for r in ranks.values() if r.get("hang")]
    # A hang stopped by the tasks' watchdog: the ranks' exits are its consequence, not its cause.
    signature = hung[0] if hung else _signature(failure)
    refusal = refuse_restart(signature, step, restarts, max_restarts)
    if refusal is not None:
        return Decision(RunState.FAILED, "gave_up", refusal, failure)
    return Decision(RunState.REQUEUED, "failed", signature, failure)


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
    """The teardown of the batch script: record the attempt's outcome, requeue when decided."""
    job_id = int(os.environ["SLURM_JOB_ID"])
    restart = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    attempt = f"{job_id}.{restart}"
    job = json.loads((slurm_dir(run_dir) / JOB_FILE).read_text())
    ranks = _rank_records(attempt_dir(run_dir, attempt))
    step = _last_step(run_dir)
    # Decided and written under the record's lock: a `moectl cancel` in between must not be
    # overwritten by a requeue.
    with registry.record_lock(run_dir):
        record = registry.read_record(run_dir)
        if record.status is RunState.CANCELLED:
            return None
        decision = decide(
            ranks,
            record.world_size,
            record.restarts,
            job["max_restarts"],
            step,
            RunLayout(run_dir).logs,
        )
        record.status = decision.status
        if decision.status is RunState.REQUEUED:
            record.restarts.append(
                Restart(
                    at=registry.now_iso(),
                    reason=decision.reason,
                    attempt=attempt,
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
    print(f"moe-parallel: attempt {attempt}: {decision.kind}: {decision.reason}", flush=True)
    if decision.status is RunState.REQUEUED:
        _requeue(run_dir, job_id)
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
