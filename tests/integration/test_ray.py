"""The Ray backend against a real Ray cluster: a head and a worker node (in its own network
namespace) on this machine, token authentication on. Runs go through `moectl submit`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.conftest import ELASTIC, TEST_DATA, TINY, TWELVE
from tests.integration.cluster_helpers import (
    assert_no_process_left,
    assert_shrunk_and_grown_back,
    events,
    heartbeat_step,
    losses,
    moectl,
    run_processes,
    state,
    wait_for,
)

pytestmark = pytest.mark.integration

ADDRESS = "http://127.0.0.1:8265"
TOKEN_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN", "RAY_ADDRESS")


@pytest.fixture
def ray_env(ray_cluster) -> dict[str, str]:
    return dict(ray_cluster.env())


@pytest.fixture
def submit(ray_env, tmp_path, data_cache):
    """submit(overrides, *flags, env=None) -> (CompletedProcess, run_dir or None)."""

    def run(overrides=(), *flags: str, env=None, address=ADDRESS):
        args = [
            "submit",
            str(TINY),
            *TEST_DATA,
            f"data.cache_dir={data_cache}",
            "log.tensorboard=false",
            *overrides,
            "--backend",
            "ray",
            "--address",
            address,
            "--runs",
            str(tmp_path / "runs"),
            *flags,
        ]
        done = moectl(*args, env={**ray_env, **(env or {})})
        run_dir = None
        for line in done.stdout.splitlines():
            if line.startswith("run directory: "):
                run_dir = Path(line.split(": ", 1)[1])
        return done, run_dir

    return run


def placements(run_dir: Path, attempt: int) -> list[str]:
    data = json.loads((run_dir / "ray" / "attempts" / f"{attempt}.json").read_text())
    return [r["ip"] for r in data["ranks"]]


def rank_process(run_dir: Path, rank: int) -> psutil.Process:
    """The rank's training process: the topmost one with its command line and RANK (a process
    it forked, e.g. a checkpoint writer, has both too, and its parent is the rank, not the
    actor)."""
    found = []
    for proc in run_processes(run_dir):
        try:
            if "moe_parallel.train.entry" in proc.cmdline() and proc.environ().get("RANK") == str(
                rank
            ):
                found.append(proc)
        except psutil.NoSuchProcess:
            continue
    pids = {p.pid for p in found}
    for proc in found:
        if proc.ppid() not in pids:
            return proc
    raise AssertionError(f"no process of rank {rank} for {run_dir}")


def test_run_across_two_nodes_matches_the_local_run(submit, reference_twelve):
    done, run_dir = submit([*TWELVE, "ray.strategy=STRICT_SPREAD"], "--wait")
    assert done.returncode == 0, done.stdout + done.stderr
    s = state(run_dir)
    assert s["status"] == "completed" and s["backend"] == "ray" and s["restarts"] == []
    assert sorted(placements(run_dir, 0)) == ["10.78.0.1", "10.78.0.11"]  # one rank per node
    got = losses(run_dir)
    assert sorted(got) == list(range(1, 13))
    for step, loss in reference_twelve.items():
        assert got[step] == pytest.approx(loss, rel=1e-5), step


def test_killed_actor_process_restarts_from_the_latest_checkpoint(submit, reference_twelve):
    done, run_dir = submit(TWELVE)
    assert done.returncode == 0, done.stderr
    wait_for(lambda: heartbeat_step(run_dir) >= 6, 300, "step 6")
    actor = rank_process(run_dir, 1).parent()  # the Ray worker process running rank 1's actor
    os.kill(actor.pid, signal.SIGKILL)
    wait_for(lambda: state(run_dir)["status"] in ("completed", "failed"), 400, "the run to end")
    s = state(run_dir)
    assert s["status"] == "completed", s
    [restart] = s["restarts"]
    assert restart["kind"] == "failed"
    assert restart["reason"].startswith("rank 1 on ") and "actor process died" in restart["reason"]
    [resume] = events(run_dir, "resume")
    assert resume["step"] in (4, 8)  # the newest checkpoint when the actor died
    assert losses(run_dir)[12] == pytest.approx(reference_twelve[12], rel=1e-5)
    assert_no_process_left(run_dir)


def test_lost_node_restarts_on_the_remaining_capacity(submit, reference_twelve):
    from cluster.testbed import ray as ray_local

    done, run_dir = submit([*TWELVE, "ray.strategy=SPREAD"])
    assert done.returncode == 0, done.stderr
    try:
        wait_for(lambda: heartbeat_step(run_dir) >= 6, 300, "step 6")
        assert sorted(placements(run_dir, 0)) == ["10.78.0.1", "10.78.0.11"]
        ray_local.stop_worker_node()  # as a machine failure: every process of the node killed
        wait_for(lambda: state(run_dir)["status"] in ("completed", "failed"), 400, "the run to end")
    finally:
        ray_local.start_worker_node()
    s = state(run_dir)
    assert s["status"] == "completed", s
    [restart] = s["restarts"]
    assert restart["kind"] == "failed" and "10.78.0.11" in restart["reason"]
    assert placements(run_dir, 1) == ["10.78.0.1", "10.78.0.1"]  # packed onto the head
    assert losses(run_dir)[12] == pytest.approx(reference_twelve[12], rel=1e-5)


def test_no_capacity_after_a_node_loss_fails_after_a_bounded_wait(submit):
    from cluster.testbed import ray as ray_local

    done, run_dir = submit([*TWELVE, "ray.strategy=STRICT_SPREAD", "ray.placement_timeout_s=10"])
    assert done.returncode == 0, done.stderr
    try:
        wait_for(lambda: heartbeat_step(run_dir) >= 3, 300, "step 3")
        ray_local.stop_worker_node()  # STRICT_SPREAD needs two nodes: no capacity to restart
        wait_for(lambda: state(run_dir)["status"] in ("completed", "failed"), 120, "the run to end")
    finally:
        ray_local.start_worker_node()
    s = state(run_dir)
    assert s["status"] == "failed"
    assert (
        "could not place 2 bundle(s) of {'CPU': 1.0} with strategy STRICT_SPREAD within 10 s"
        in s["failure_reason"]
    )
    assert len(s["restarts"]) == 1 and "10.78.0.11" in s["restarts"][0]["reason"]


# Rank 0 sleeps in every step, so the shrunk run is still short of its last checkpoint when the
# worker node is back (a node starts in 10-20 s here).
SLOW_STEPS = {"MOE_PARALLEL_FAULT": "slow:rank=0:ms=1500"}


def test_elastic_lost_node_shrinks_the_run_and_it_grows_back(submit, reference_elastic):
    from cluster.testbed import ray as ray_local

    done, run_dir = submit([*ELASTIC, "ray.strategy=STRICT_SPREAD"], env=SLOW_STEPS)
    assert done.returncode == 0, done.stderr
    try:
        wait_for(lambda: heartbeat_step(run_dir) >= 5, 300, "step 5")
        assert sorted(placements(run_dir, 0)) == ["10.78.0.1", "10.78.0.11"]
        ray_local.stop_worker_node()  # as a machine failure: every process of the node killed
        wait_for(lambda: state(run_dir).get("resizes"), 120, "the shrink")
    finally:
        ray_local.start_worker_node()
    wait_for(lambda: state(run_dir)["status"] in ("completed", "failed"), 600, "the run to end")

    shrink, _ = assert_shrunk_and_grown_back(run_dir, reference_elastic)
    assert "10.78.0.11" in shrink["cause"] and "node was lost" in shrink["cause"]
    assert placements(run_dir, 1) == ["10.78.0.1"]  # the shrunk attempt: one rank on the head
    assert sorted(placements(run_dir, 2)) == ["10.78.0.1", "10.78.0.11"]


def test_status_shows_the_run_and_cancel_frees_its_resources(submit, ray_env):
    done, run_dir = submit(["train.steps=400"])
    assert done.returncode == 0, done.stderr
    wait_for(lambda: heartbeat_step(run_dir) >= 2, 300, "the run to start stepping")
    shown = moectl("status", "--runs", str(run_dir.parent), env=ray_env)
    assert "ray" in shown.stdout and "running" in shown.stdout and "RUNNING" in shown.stdout, shown
    assert moectl("cancel", str(run_dir), env=ray_env).returncode == 0
    assert state(run_dir)["status"] == "cancelled"
    wait_for(lambda: not run_processes(run_dir), 60, "the ranks to exit")

    def groups_removed():
        # In a fresh process: Ray reads the token settings once, at import.
        code = (
            "import json; from ray.util.state import list_placement_groups as l; "
            f"print(json.dumps([g.state for g in l(address={ADDRESS!r}, "
            "raise_on_missing_output=False)]))"
        )
        out = subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, **ray_env},
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        states = json.loads(out.stdout.strip().splitlines()[-1])
        return states and all(st == "REMOVED" for st in states)

    wait_for(groups_removed, 60, "the placement group to be removed")
    assert state(run_dir)["status"] == "cancelled"


@pytest.mark.parametrize(
    "extra,env_change,address,message",
    [
        (
            [],
            {},
            "http://127.0.0.1:9",
            "cannot reach a Ray cluster's job server at http://127.0.0.1:9",
        ),
        (
            ["ray.cpus_per_rank=3"],
            {},
            ADDRESS,
            "cannot hold 2 rank(s) of {'CPU': 3.0} with strategy PACK",
        ),
        (["parallel.data=4", "ray.strategy=STRICT_SPREAD"], {}, ADDRESS, "cannot hold 4 rank(s)"),
        ([], {k: "" for k in TOKEN_VARS}, ADDRESS, "requires a token and refused ours"),
        (
            ["recovery.min_data_parallel=3"],
            {},
            ADDRESS,
            "recovery.min_data_parallel=3 is above parallel.data=2: allowed 1..2",
        ),
    ],
)
def test_bad_input_is_refused_before_anything_is_submitted(
    submit, tmp_path, extra, env_change, address, message
):
    done, run_dir = submit(
        ["train.steps=2", "train.warmup_steps=1", *extra], env=env_change, address=address
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert run_dir is None and not (tmp_path / "runs").exists()
