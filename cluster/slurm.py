"""The SLURM backend: a run becomes one sbatch job (through submitit) with one task per rank.

* ``submit`` checks the profile against the live cluster (partition, node count) before
  anything is queued, writes ``slurm/job.json`` and ``state.json``, and submits
  :class:`cluster.slurm_job.SlurmRankTask` with ``--kill-on-bad-exit`` (a crashed rank stops
  the others at once instead of leaving them blocked in a collective) and ``--requeue``.
* The job's teardown decides what happens after the ranks end (see :mod:`cluster.slurm_job`).
* An elastic run (``RunSpec.elastic``) is submitted with ``--no-kill`` as well: a lost node then
  ends the srun step on it, not the job, and the teardown goes on in the allocation with fewer
  tasks; it grows back through a requeue.
* With ``slurm.spare_nodes: k`` the job holds ``nodes + k`` nodes (also ``--no-kill``) and its
  srun runs the ranks on ``nodes`` of them (``--relative=k``: the batch host stays a spare); a
  lost node is replaced by a spare in a new full-size step of the allocation.
* ``status`` reads ``state.json`` and asks SLURM (squeue, then scontrol, then sacct); a job that
  SLURM ended without our teardown running (time limit without warning, node loss of the batch
  host) is recorded as failed with SLURM's state.
"""

from __future__ import annotations

import json
import math
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from cluster import registry
from cluster.backend import BackendError, QueuedBackend, RunHandle, RunSpec
from cluster.profile import ClusterProfile, ProfileError, SlurmProfile
from cluster.registry import RunRecord
from cluster.slurm_job import JOB_FILE, SlurmRankTask, slurm_dir, submitit_dir
from cluster.state import RunState

BACKEND_NAME = "slurm"
# sbatch options the backend sets itself; a profile's extra ``sbatch`` options may not touch them.
OWNED_SBATCH = (
    "nodes",
    "ntasks-per-node",
    "ntasks_per_node",
    "output",
    "error",
    "signal",
    "open-mode",
    "requeue",
    "job-name",
    "job_name",
    "time",
    "partition",
)
# SLURM states after which the job will not run again.
ENDED_STATES = (
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
    "UNKNOWN",
)
COMMAND_TIMEOUT_S = 30


class SlurmError(BackendError):
    """A SLURM command failed (its stderr is in the message)."""


@dataclass(frozen=True)
class Partition:
    name: str
    nodes: int
    up: bool
    default: bool


def _run(args: list[str]) -> str:
    try:
        done = subprocess.run(
            args, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False
        )
    except FileNotFoundError:
        raise SlurmError(
            f"{args[0]} not found: is this a SLURM login node? (start a local "
            "cluster with `python -m cluster.testbed.slurm start`)"
        ) from None
    if done.returncode != 0:
        raise SlurmError(f"{shlex.join(args)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def _answer(args: list[str]) -> str | None:
    """A query's output, or None when it fails (the job is unknown to that command)."""
    done = subprocess.run(
        args, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False
    )
    return done.stdout if done.returncode == 0 else None


def partitions() -> dict[str, Partition]:
    out = {}
    for line in _run(["sinfo", "-h", "-o", "%P %D %a"]).splitlines():
        name, nodes, avail = line.split()
        default = name.endswith("*")
        name = name.rstrip("*")
        part = out.get(name)
        count = int(nodes) + (part.nodes if part else 0)  # sinfo splits a partition by node state
        out[name] = Partition(name, count, avail == "up", default or bool(part and part.default))
    return out


def check_profile(profile: SlurmProfile) -> Partition:
    """The partition the job would run in; ProfileError if the cluster cannot take the job."""
    parts = partitions()
    if not parts:
        raise ProfileError("sinfo lists no partitions: the cluster has none configured")
    if profile.partition is None:
        defaults = [p for p in parts.values() if p.default]
        if not defaults:
            raise ProfileError(
                f"no default partition: set slurm.partition to one of {', '.join(parts)}"
            )
        part = defaults[0]
    elif profile.partition not in parts:
        raise ProfileError(
            f"unknown partition {profile.partition!r}: this cluster has {', '.join(sorted(parts))}"
        )
    else:
        part = parts[profile.partition]
    if profile.nodes + profile.spare_nodes > part.nodes:
        spares = f" + slurm.spare_nodes={profile.spare_nodes}" if profile.spare_nodes else ""
        raise ProfileError(
            f"slurm.nodes={profile.nodes}{spares} but partition {part.name!r} has only "
            f"{part.nodes} node(s)"
        )
    clash = sorted(k for k in profile.sbatch if k in OWNED_SBATCH)
    if clash:
        raise ProfileError(
            f"slurm.sbatch may not set {', '.join(clash)}: use the profile's own "
            "fields (nodes, time, partition, job_name) instead"
        )
    return part


class SlurmBackend(QueuedBackend):
    """Submits runs as SLURM jobs described by a :class:`SlurmProfile`."""

    name = BACKEND_NAME

    def __init__(self, profile: SlurmProfile | None = None, poll_s: float = 1.0) -> None:
        self.profile = profile or SlurmProfile()
        self.poll_s = poll_s

    @classmethod
    def from_profile(cls, profile: ClusterProfile) -> SlurmBackend:
        return cls(profile.slurm)

    @classmethod
    def for_run(cls, run_dir: Path) -> SlurmBackend:
        return cls()  # refresh and cancel need only the job ids of the run's record

    @property
    def ranks_have_gpus(self) -> bool:
        return self.profile.gpus_per_node > 0

    def check_submission(self, world_size: int) -> None:
        self.profile.ranks_on_each_node(world_size)
        check_profile(self.profile)

    def ranks_per_node_at_most(self, world_size: int) -> int:
        """The job's ranks on each node: a shrunk run keeps whole nodes of them."""
        return self.profile.ranks_on_each_node(world_size)

    def submit(self, spec: RunSpec) -> RunHandle:
        import submitit

        self.check_env(spec)
        per_node = self.profile.ranks_on_each_node(spec.world_size)
        check_profile(self.profile)
        run_dir = spec.run_dir.resolve()
        folder = slurm_dir(run_dir)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / JOB_FILE).write_text(
            json.dumps(
                {
                    "max_restarts": self.profile.max_restarts,
                    "world_size": spec.world_size,
                    "ranks_per_node": per_node,
                    "elastic": spec.elastic.to_dict() if spec.elastic is not None else None,
                    "profile": self.profile.model_dump(mode="json"),
                },
                indent=1,
            )
        )
        record = self.write_pending_record(spec, run_dir)
        executor = submitit.SlurmExecutor(folder=submitit_dir(run_dir), python=self.profile.python)
        executor.update_parameters(**self.sbatch_parameters(run_dir, spec, per_node))
        # An entry started with this interpreter runs with the job's own (slurm.python) instead.
        task = SlurmRankTask(
            str(run_dir),
            tuple(spec.entry),
            dict(spec.env),
            spec.threads_per_rank,
            job_python=spec.entry[0] == sys.executable,
            hang_timeout_s=spec.hang_timeout_s,
        )
        try:
            job = executor.submit(task)
        except Exception as exc:  # sbatch refused it: the record must not claim it is queued
            record.status = RunState.FAILED
            record.failure_reason = f"sbatch refused the job: {exc}"
            record.ended_at = registry.now_iso()
            registry.write_record(run_dir, record)
            raise SlurmError(record.failure_reason) from exc

        # The job may already be running and have written its own status (measured: started
        # 0.02 s after sbatch): add the id to the record as it is now, never rewrite "pending".
        def add_job_id(current: RunRecord) -> None:
            if str(job.job_id) not in current.job_ids:
                current.job_ids.append(str(job.job_id))

        record = registry.update_record(run_dir, add_job_id)
        return RunHandle(self.name, run_dir, tuple(record.job_ids))

    def sbatch_parameters(self, run_dir: Path, spec: RunSpec, per_node: int) -> dict:
        p = self.profile
        python = p.python or shlex.quote(sys.executable)
        params = dict(
            job_name=p.job_name or run_dir.name,
            nodes=p.nodes + p.spare_nodes,
            ntasks_per_node=per_node,
            cpus_per_task=p.cpus_per_rank,
            time=math.ceil(p.time_limit_s / 60),
            signal_delay_s=p.signal_delay_s,
            stderr_to_stdout=True,
            srun_args=["--kill-on-bad-exit=1"],
            setup=list(p.setup),
            teardown=[
                f"{python} -m cluster.slurm_job finish {shlex.quote(str(run_dir))} "
                "$MOE_PARALLEL_SRUN_EXIT"
            ],
            additional_parameters={"requeue": True, **p.sbatch},
        )
        if spec.elastic is not None or p.spare_nodes:
            # A lost node ends the step on it, not the job: the teardown goes on with the rest.
            params["additional_parameters"]["no-kill"] = True
        if p.spare_nodes:
            # The ranks on `nodes` nodes after the first `spare_nodes` (the batch host's first).
            params["srun_args"] += [
                f"--nodes={p.nodes}",
                f"--ntasks={spec.world_size}",
                f"--ntasks-per-node={per_node}",
                f"--relative={p.spare_nodes}",
            ]
        # The srun line is the last command before the teardown: keep its exit status.
        params["teardown"].insert(0, "MOE_PARALLEL_SRUN_EXIT=$?")
        for key in ("partition", "account", "qos", "constraint", "mem"):
            if getattr(p, key) is not None:
                params[key] = getattr(p, key)
        if p.gpus_per_node:
            params["gpus_per_node"] = p.gpus_per_node
        if p.exclusive:
            params["exclusive"] = True
        return params

    def stop_jobs(self, record: RunRecord) -> None:
        _run(["scancel", record.job_ids[-1]])  # earlier ids of a resubmitted run have ended

    def job_state(self, job_id: str) -> str:
        """SLURM's state of a job: squeue for queued/running jobs, scontrol for recently ended
        ones, sacct when accounting exists; UNKNOWN when none of them knows the job any more."""
        queued = _answer(["squeue", "-h", "-j", job_id, "-o", "%T"])
        if queued and queued.strip():
            return queued.split()[0]
        recent = _answer(["scontrol", "show", "job", "-o", job_id])
        for item in (recent or "").split():
            if item.startswith("JobState="):
                return item.split("=", 1)[1]
        accounted = _answer(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"])
        if accounted and accounted.strip():
            return accounted.split()[0]
        return "UNKNOWN"

    def refresh(self, run_dir: Path) -> RunRecord:
        """``state.json``, corrected when SLURM says the job is over but the record does not."""
        record = registry.read_record(run_dir)
        if record.status.terminal or not record.job_ids:
            return record
        state = self.job_state(record.job_ids[-1])
        if state in ENDED_STATES:
            time.sleep(1.0)  # the teardown may be writing its decision right now

            def lost(record) -> None:
                if not record.status.terminal and record.status is not RunState.REQUEUED:
                    record.status = RunState.FAILED
                    record.ended_at = registry.now_iso()
                    record.failure_reason = (
                        f"SLURM ended job {record.job_ids[-1]} as {state} before moe-parallel's "
                        "teardown could record why (time limit without warning, or the batch "
                        "node was lost)"
                    )

            record = registry.update_record(run_dir, lost)
        return record
