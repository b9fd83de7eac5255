"""The Ray backend, submitting side: a run becomes one Ray job whose driver places the ranks.

``submit`` checks the cluster first (reachable, token accepted, enough resources for the
placement group on its alive nodes), writes ``ray/job.json`` and ``state.json``, and submits
``python -m cluster.ray_driver RUN_DIR`` through Ray's job submission (the Jobs API on the
dashboard address), so the run outlives the submitting terminal. Everything after that is the
driver's (:mod:`cluster.ray_driver`). ``cancel`` records the run as cancelled, then stops the
job: its actors and placement group go with it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path

import cluster
from cluster import registry
from cluster.backend import BackendError, QueuedBackend, RunHandle, RunSpec, finished_record
from cluster.profile import ClusterProfile, ProfileError, RayProfile
from cluster.registry import RunRecord
from cluster.state import RunState

BACKEND_NAME = "ray"
JOB_FILE = "job.json"  # ray/job.json: what the driver needs (entry, world size, profile)
ENDED = ("SUCCEEDED", "FAILED", "STOPPED")
REQUEST_TIMEOUT_S = 30


def ray_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "ray"


class RayError(BackendError):
    """The Ray cluster refused or failed a request."""


def _explain(address: str, exc: Exception) -> RayError:
    text = str(exc)
    if "Authentication" in text or "401" in text or "token" in text.lower():
        return RayError(
            f"the Ray cluster at {address} requires a token and refused ours: set "
            "RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH (or RAY_AUTH_TOKEN) to the "
            f"cluster's token ({text.splitlines()[0] if text else type(exc).__name__})"
        )
    if isinstance(exc, (ConnectionError, TimeoutError, OSError)) or "connect" in text.lower():
        return RayError(
            f"cannot reach a Ray cluster's job server at {address}: {text or exc!r} "
            "(is the head running, with its dashboard, and is the address "
            "http://HEAD:8265?)"
        )
    return RayError(f"Ray cluster at {address}: {type(exc).__name__}: {text}")


# Ray's clients prefer these variables over an address passed to them; moectl's address
# (--address, ray.address, or $RAY_ADDRESS when it is http) must be the one used.
_ADDRESS_VARS = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")


@contextlib.contextmanager
def _only(address: str):
    saved = {k: os.environ.pop(k) for k in _ADDRESS_VARS if k in os.environ}
    try:
        yield address
    finally:
        os.environ.update(saved)


def client(address: str):
    from ray.job_submission import JobSubmissionClient

    try:
        with _only(address):
            return JobSubmissionClient(address)
    except Exception as exc:  # Ray raises plain Exceptions and ConnectionErrors here
        raise _explain(address, exc) from exc


def alive_nodes(address: str) -> list[dict]:
    """Alive nodes with their total resources (through the dashboard's state API)."""
    from ray.util.state import list_nodes

    try:
        with _only(address):
            nodes = list_nodes(
                address=address,
                filters=[("state", "=", "ALIVE")],
                detail=True,
                timeout=REQUEST_TIMEOUT_S,
                raise_on_missing_output=False,
            )
    except Exception as exc:
        raise _explain(address, exc) from exc
    return [{"ip": n.node_ip, "resources": dict(n.resources_total)} for n in nodes]


def bundles_per_node(nodes: list[dict], bundle: dict[str, float]) -> list[int]:
    """How many ``bundle``s each node's total resources hold."""
    return [min(math.floor(n["resources"].get(k, 0) / v) for k, v in bundle.items()) for n in nodes]


def bundles_that_fit(nodes: list[dict], bundle: dict[str, float], strategy: str) -> int:
    """The most bundles one placement group with ``strategy`` can hold on these nodes."""
    per_node = bundles_per_node(nodes, bundle)
    if strategy == "STRICT_PACK":
        return max(per_node, default=0)
    if strategy == "STRICT_SPREAD":
        return sum(1 for p in per_node if p >= 1)
    return sum(per_node)


def placeable(nodes: list[dict], bundle: dict[str, float], count: int, strategy: str) -> bool:
    """Whether ``count`` bundles fit on these nodes' total resources under ``strategy``."""
    return bundles_that_fit(nodes, bundle, strategy) >= count


def check_capacity(profile: RayProfile, world_size: int) -> None:
    address = profile.resolved_address()
    nodes = alive_nodes(address)
    if not placeable(nodes, profile.bundle(), world_size, profile.strategy):
        seen = (
            "; ".join(
                f"{n['ip']}: CPU {n['resources'].get('CPU', 0):g}, GPU "
                f"{n['resources'].get('GPU', 0):g}"
                for n in nodes
            )
            or "no alive nodes"
        )
        raise ProfileError(
            f"the Ray cluster at {address} cannot hold {world_size} rank(s) of "
            f"{profile.bundle()} with strategy {profile.strategy}: its alive nodes "
            f"have {seen}"
        )


class RayBackend(QueuedBackend):
    name = BACKEND_NAME

    def __init__(self, profile: RayProfile | None = None, poll_s: float = 1.0) -> None:
        self.profile = profile or RayProfile()
        self.poll_s = poll_s

    @classmethod
    def from_profile(cls, profile: ClusterProfile) -> RayBackend:
        return cls(profile.ray)

    @classmethod
    def for_run(cls, run_dir: Path) -> RayBackend:
        """With the profile (and address) the run was submitted with (``ray/job.json``)."""
        job = json.loads((ray_dir(run_dir) / JOB_FILE).read_text())
        return cls(RayProfile(**job["profile"]))

    @property
    def ranks_have_gpus(self) -> bool:
        return self.profile.gpus_per_rank > 0

    def check_submission(self, world_size: int) -> None:
        check_capacity(self.profile, world_size)

    def ranks_per_node_at_most(self, world_size: int) -> int | None:
        """The most ranks one alive node holds (what a shrunk run can count on per node)."""
        per_node = bundles_per_node(alive_nodes(self.address), self.profile.bundle())
        if self.profile.strategy == "STRICT_SPREAD":
            return min(max(per_node, default=0), 1)
        return max(per_node, default=0)

    @property
    def address(self) -> str:
        return self.profile.resolved_address()

    def submit(self, spec: RunSpec) -> RunHandle:
        self.check_env(spec)
        check_capacity(self.profile, spec.world_size)
        run_dir = spec.run_dir.resolve()
        previous = finished_record(run_dir)
        submission = f"moe-{run_dir.name}-{len(previous.job_ids) if previous else 0}"
        folder = ray_dir(run_dir)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / JOB_FILE).write_text(
            json.dumps(
                {
                    "world_size": spec.world_size,
                    "entry": list(spec.entry),
                    "env": dict(spec.env),
                    "threads_per_rank": spec.threads_per_rank,
                    "job_python": spec.entry[0] == sys.executable,
                    "hang_timeout_s": spec.hang_timeout_s,
                    "elastic": spec.elastic.to_dict() if spec.elastic is not None else None,
                    "profile": self.profile.model_dump(mode="json"),
                },
                indent=1,
            )
        )
        record = self.write_pending_record(spec, run_dir)
        code_root = str(Path(cluster.__file__).resolve().parents[1])
        try:
            client(self.address).submit_job(
                entrypoint=f"{sys.executable} -m cluster.ray_driver {run_dir}",
                submission_id=submission,
                runtime_env={
                    "env_vars": {"PYTHONPATH": code_root, "MOE_PARALLEL_RAY_SUBMISSION": submission}
                },
                entrypoint_num_cpus=0,
            )
        except Exception as exc:
            error = exc if isinstance(exc, RayError) else _explain(self.address, exc)
            record.status, record.failure_reason = RunState.FAILED, f"submission refused: {error}"
            record.ended_at = registry.now_iso()
            registry.write_record(run_dir, record)
            raise error from exc
        # Under the record's lock: the driver may already have written "running".
        record = registry.update_record(run_dir, lambda r: r.job_ids.append(submission))
        return RunHandle(self.name, run_dir, tuple(record.job_ids))

    def job_state(self, submission: str) -> str:
        try:
            return str(client(self.address).get_job_status(submission).value)
        except RayError:
            raise
        except Exception as exc:
            raise _explain(self.address, exc) from exc

    def stop_jobs(self, record: RunRecord) -> None:
        try:
            client(self.address).stop_job(record.job_ids[-1])
        except RayError:
            raise
        except Exception as exc:
            raise _explain(self.address, exc) from exc

    def refresh(self, run_dir: Path) -> RunRecord:
        """``state.json``, corrected when Ray says the job ended but the driver did not record it
        (the driver itself was killed, or the head went away)."""
        record = registry.read_record(run_dir)
        if record.status.terminal or not record.job_ids:
            return record
        state = self.job_state(record.job_ids[-1])
        if state in ENDED:
            time.sleep(1.0)  # the driver may be writing its outcome right now
            logs = client(self.address).get_job_logs(record.job_ids[-1]).splitlines()[-10:]

            def lost(record) -> None:
                if not record.status.terminal:
                    record.status, record.ended_at = RunState.FAILED, registry.now_iso()
                    record.failure_reason = (
                        f"Ray job {record.job_ids[-1]} ended as {state} "
                        "before its driver recorded an outcome; driver log "
                        "tail:\n" + "\n".join(logs)
                    )

            record = registry.update_record(run_dir, lost)
        return record
