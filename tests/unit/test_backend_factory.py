"""Picking a backend (cluster.backends): by name, for a cluster profile, for an existing run; and
the one record_hang() that the local launcher, the SLURM tasks and the Ray driver share."""

from __future__ import annotations

import io
import json

import pytest

from cluster import RunHandle, RunRecord, RunState, new_run_dir, read_record, write_record
from cluster.backends import (
    BACKEND_NAMES,
    backend_class,
    backend_for_profile,
    backend_for_run,
    get_backend,
)
from cluster.local import LocalBackend
from cluster.profile import load_profile
from cluster.ray_backend import JOB_FILE, RayBackend, ray_dir
from cluster.registry import append_to_logs
from cluster.slurm import SlurmBackend
from cluster.watchdog import HangWatchdog, record_hang


def test_every_name_has_its_class_and_an_unknown_name_is_one_clear_line():
    assert BACKEND_NAMES == ("local", "slurm", "ray")
    assert [backend_class(n) for n in BACKEND_NAMES] == [LocalBackend, SlurmBackend, RayBackend]
    assert all(backend_class(n).name == n for n in BACKEND_NAMES)
    with pytest.raises(ValueError) as err:
        get_backend("k8s")
    assert str(err.value) == "unknown backend 'k8s': allowed values are local, slurm, ray"


def test_a_profile_chooses_and_configures_the_backend():
    slurm = backend_for_profile(
        load_profile(None, ["backend=slurm", "slurm.nodes=2", "slurm.gpus_per_node=4"])
    )
    assert isinstance(slurm, SlurmBackend) and slurm.profile.nodes == 2 and slurm.ranks_have_gpus
    ray = backend_for_profile(load_profile(None, ["backend=ray", "ray.strategy=SPREAD"]))
    assert isinstance(ray, RayBackend) and ray.profile.strategy == "SPREAD"
    assert ray.ranks_have_gpus is False
    local = backend_for_profile(load_profile(None, ["backend=local"]))
    assert isinstance(local, LocalBackend) and local.ranks_have_gpus is None
    # Local ranks share this machine's cores; a scheduler gives each rank its own CPUs.
    assert local.shared_threads_per_rank(10**6) == 1
    assert slurm.shared_threads_per_rank(4) is None and ray.shared_threads_per_rank(4) is None


def test_a_run_gets_its_backend_back_from_its_record(tmp_path):
    local = new_run_dir(tmp_path, "local")
    write_record(
        local,
        RunRecord(backend="local", status=RunState.RUNNING, world_size=2, job_ids=["11", "12"]),
    )
    backend = backend_for_run(local)
    assert isinstance(backend, LocalBackend)
    assert backend.refresh(local).status is RunState.RUNNING  # as its launcher wrote it
    assert backend.scheduler_state(read_record(local)) == ""
    assert RunHandle.of_run(local, read_record(local)) == RunHandle("local", local, ("11", "12"))

    ray = new_run_dir(tmp_path, "ray")
    ray_dir(ray).mkdir()
    (ray_dir(ray) / JOB_FILE).write_text(json.dumps({"profile": {"address": "http://head:8265"}}))
    record = RunRecord(backend="ray", status=RunState.PENDING, world_size=2)
    backend = backend_for_run(ray, record)  # the record the caller read: state.json not needed
    assert isinstance(backend, RayBackend) and backend.address == "http://head:8265"
    assert backend.scheduler_state(record) == ""  # no job yet: nothing to ask

    slurm = new_run_dir(tmp_path, "slurm")
    write_record(slurm, RunRecord(backend="slurm", status=RunState.PENDING, world_size=2))
    assert isinstance(backend_for_run(slurm), SlurmBackend)
    assert backend_for_run(slurm).refresh(slurm).status is RunState.PENDING  # no job id yet


def _hang(tmp_path) -> dict:
    stacks = tmp_path / "stacks.txt"
    stacks.write_text("Thread 0x1 (most recent call first):\n")
    beat = {
        "rank": 0,
        "host": "h",
        "pid": 7,
        "started": 1.0,
        "time": 10.0,
        "step": 3,
        "phase": "optimizer",
        "collective": "all_reduce",
        "collective_since": 5.0,
        "last_collective": "all_reduce",
        "stacks": str(stacks),
    }
    watchdog = HangWatchdog(1, 1, since=0.0)
    watchdog.observe({0: beat}, now=10)
    return watchdog.observe({0: beat}, now=11)


@pytest.mark.parametrize("held", [False, True])
def test_record_hang_writes_state_json_prints_and_logs(tmp_path, held):
    run_dir = new_run_dir(tmp_path, "run")
    record = RunRecord(backend="local", status=RunState.RUNNING, world_size=1)
    write_record(run_dir, record)
    out = io.StringIO()
    hang = record_hang(
        run_dir, _hang(tmp_path), "local.0", out=out, record=record if held else None
    )
    assert hang.step == 3 and hang.attempt == "local.0" and hang.stacks_missing == []
    assert read_record(run_dir).hangs == [hang]
    assert (record.hangs == [hang]) is held  # a held record is the one written
    assert out.getvalue().startswith("moe-parallel: HANG DETECTED at ")
    append_to_logs(run_dir, [0], ["moe-parallel launcher: hang", "restarting"])
    assert (
        run_dir / "logs" / "rank0.log"
    ).read_text() == "==== moe-parallel launcher: hang\n==== restarting\n"
