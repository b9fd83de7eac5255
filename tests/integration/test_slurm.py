"""The SLURM backend against a real SLURM (slurmctld + two slurmd on simulated hosts).

Every run goes through `moectl submit` as a user would type it; losses are compared with the
same run on the local backend.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ELASTIC, REPO, TEST_DATA, TINY, TWELVE
from tests.integration.cluster_helpers import (
    assert_no_process_left,
    assert_shrunk_and_grown_back,
    events,
    heartbeat_step,
    losses,
    moectl,
    run_processes,
    state,
    step_losses,
    wait_for,
)

pytestmark = pytest.mark.integration

PROFILE = REPO / "configs" / "clusters" / "local_slurm.yaml"


@pytest.fixture
def submit(slurm_cluster, tmp_path, data_cache):
    """submit(overrides, *flags, env=None) -> (CompletedProcess, run_dir or None)."""

    def run(overrides=(), *flags: str, env=None, config=TINY):
        args = [
            "submit",
            str(config),
            *TEST_DATA,
            f"data.cache_dir={data_cache}",
            "log.tensorboard=false",
            *overrides,
            "--cluster",
            str(PROFILE),
            "--runs",
            str(tmp_path / "runs"),
            *flags,
        ]
        done = moectl(*args, env=env)
        run_dir = None
        for line in done.stdout.splitlines():
            if line.startswith("run directory: "):
                run_dir = Path(line.split(": ", 1)[1])
        return done, run_dir

    return run


def rank_hosts(run_dir: Path) -> dict[int, str]:
    out = {}
    for path in (run_dir / "slurm" / "attempts").glob("*/rank*.json"):
        data = json.loads(path.read_text())
        out[data["rank"]] = data["host"]
    return out


def attempt_hosts(run_dir: Path, attempt: str) -> dict[int, str]:
    """Where each rank of one attempt ran (its rank records)."""
    folder = run_dir / "slurm" / "attempts" / attempt
    return {
        data["rank"]: data["host"]
        for data in (json.loads(p.read_text()) for p in folder.glob("rank*.json"))
    }


def squeue_ids() -> set[str]:
    out = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, timeout=30)
    return set(out.stdout.split())


def test_two_node_run_matches_the_local_run(submit, reference_twelve):
    done, run_dir = submit(TWELVE, "--nodes", "2", "--wait")
    assert done.returncode == 0, (
        done.stdout + done.stderr + (run_dir / "logs/rank0.log").read_text()
    )
    assert state(run_dir)["status"] == "completed"
    assert rank_hosts(run_dir) == {0: "n1", 1: "n2"}  # one rank on each simulated host
    got = losses(run_dir)
    assert sorted(got) == list(range(1, 13))
    for step, loss in reference_twelve.items():
        assert got[step] == pytest.approx(loss, rel=1e-5), step


def test_preempted_run_checkpoints_requeues_and_ends_like_an_uninterrupted_run(
    submit, reference_twelve
):
    done, run_dir = submit(TWELVE)
    assert done.returncode == 0, done.stderr
    job = state(run_dir)["job_ids"][-1]
    seen = set()

    def running_at_step_5():
        seen.add(state(run_dir)["status"])
        return heartbeat_step(run_dir) >= 5

    wait_for(running_at_step_5, 300, "step 5")
    # What SLURM sends before the time limit (--signal=USR2@delay), sent now.
    subprocess.run(["scancel", "--signal=USR2", job], check=True, timeout=30)

    def ended():
        s = state(run_dir)
        seen.add(s["status"])
        return s["status"] in ("completed", "failed", "cancelled")

    wait_for(ended, 400, "the requeued run to end", poll=0.2)
    s = state(run_dir)
    assert s["status"] == "completed", s
    # "pending" is not required: on this idle cluster the job may start 0.02 s after sbatch,
    # before the first look (and submit must not write "pending" over the job's "running").
    assert {"running", "requeued", "completed"} <= seen, seen
    assert s["job_ids"] == [job]  # requeued, not a new job
    [restart] = s["restarts"]
    assert restart["kind"] == "preempted" and restart["attempt"] == f"{job}.0"
    [stopped] = events(run_dir, "stopped")
    assert stopped["signal"] == "SIGUSR2" and 5 <= stopped["step"] < 12
    assert (run_dir / "checkpoints" / f"step_{stopped['step']:08d}").is_dir()
    [resume] = events(run_dir, "resume")
    assert resume["step"] == stopped["step"]
    got = losses(run_dir)
    assert got[12] == pytest.approx(reference_twelve[12], rel=1e-5)
    for step in range(stopped["step"] + 1, 13):
        assert got[step] == pytest.approx(reference_twelve[step], rel=1e-5), step


def test_killed_rank_is_resubmitted_and_the_run_finishes(submit, reference_twelve):
    done, run_dir = submit(
        TWELVE, "--wait", env={"MOE_PARALLEL_FAULT": "kill:rank=1:step=6:times=1"}
    )
    assert done.returncode == 0, done.stdout + done.stderr
    s = state(run_dir)
    assert s["status"] == "completed"
    [restart] = s["restarts"]
    assert restart["kind"] == "failed"
    assert restart["reason"] == "rank 1 was killed by signal SIGKILL"
    assert restart["step"] == 6
    [resume] = events(run_dir, "resume")
    assert resume["step"] == 4  # the newest checkpoint before the crash
    assert losses(run_dir)[12] == pytest.approx(reference_twelve[12], rel=1e-5)
    # The first attempt's surviving rank died with it (not re-parented to init and left blocked).
    assert_no_process_left(run_dir)


def test_a_failure_that_repeats_stops_with_a_clear_message(submit):
    done, run_dir = submit(
        ["train.steps=6", "checkpoint.interval=null", "slurm.max_restarts=5"],
        "--wait",
        env={"MOE_PARALLEL_FAULT": "kill:rank=0:step=2"},
    )
    assert done.returncode != 0
    s = state(run_dir)
    assert s["status"] == "failed"
    assert len(s["restarts"]) == 1  # restarted once, then recognised the same failure
    assert "the same failure happened at the same step (2)" in s["failure_reason"]
    assert "rank 0 was killed by signal SIGKILL" in s["failure_reason"]
    shown = moectl("status", str(run_dir))
    assert "status: failed" in shown.stdout and "same failure" in shown.stdout
    # Once the cause is fixed (here: no more fault), the run is resubmitted where it stands.
    again = moectl("submit", "--resume", str(run_dir), "--cluster", str(PROFILE), "--wait")
    assert again.returncode == 0, again.stdout + again.stderr
    s = state(run_dir)
    assert s["status"] == "completed" and len(s["job_ids"]) == 2 and len(s["restarts"]) == 1


SLOW_STEPS = {"MOE_PARALLEL_FAULT": "slow:rank=0:ms=1500"}


# SLURM calls the node down after SlurmdTimeout (20 s on the local cluster), and the requeue waits
# for signals SLURM queued for it (up to 75 s): about 3 minutes on an idle machine.
@pytest.mark.timeout(900)
def test_elastic_lost_node_goes_on_in_the_job_and_grows_back_through_a_requeue(
    submit, reference_elastic
):
    from cluster.testbed import slurm as slurm_local

    done, run_dir = submit(ELASTIC, "--nodes", "2", env=SLOW_STEPS)
    assert done.returncode == 0, done.stdout + done.stderr
    job = state(run_dir)["job_ids"][-1]
    try:
        wait_for(lambda: heartbeat_step(run_dir) >= 6, 300, "step 6")
        slurm_local.stop_node("n2")  # a whole-node loss: its slurmd, slurmstepd and rank
        wait_for(lambda: state(run_dir).get("resizes"), 300, "the shrink")
    finally:
        slurm_local.start_node("n2")
    wait_for(lambda: state(run_dir)["status"] in ("completed", "failed"), 900, "the run to end")

    shrink, grow = assert_shrunk_and_grown_back(run_dir, reference_elastic)
    s = state(run_dir)
    assert s["job_ids"] == [job]  # shrunk inside the job, grown back by requeueing it
    assert shrink["cause"].startswith("node n2 was lost") and shrink["attempt"] == f"{job}.0.1"
    assert "to grow back" in grow["cause"] and grow["attempt"] == f"{job}.1"
    assert [r["kind"] for r in s["restarts"]] == ["failed", "resized"]
    # The shrunk attempt ran as a second srun step of the first allocation, on the host left;
    # the requeued job had both hosts again.
    assert attempt_hosts(run_dir, f"{job}.0.1") == {0: "n1"}
    assert attempt_hosts(run_dir, f"{job}.1") == {0: "n1", 1: "n2"}


def test_a_lost_node_is_replaced_by_the_spare_at_the_full_size_in_the_job(submit, reference_twelve):
    from cluster.testbed import slurm as slurm_local

    # Restart mode, two ranks on one node and one spare: the job holds n1 (its batch host, the
    # spare) and n2 (the ranks).
    done, run_dir = submit([*TWELVE, "slurm.spare_nodes=1"], "--nodes", "1", env=SLOW_STEPS)
    assert done.returncode == 0, done.stdout + done.stderr
    job = state(run_dir)["job_ids"][-1]
    try:
        wait_for(lambda: heartbeat_step(run_dir) >= 6, 300, "step 6")
        assert state(run_dir)["master_addr"] == "n2"  # rank 0 runs on n2, n1 is idle
        slurm_local.stop_node("n2")  # a whole-node loss: its slurmd, slurmstepd and ranks
        wait_for(lambda: state(run_dir).get("restarts"), 300, "the restart on the spare")
    finally:
        slurm_local.start_node("n2")
    wait_for(lambda: state(run_dir)["status"] in ("completed", "failed"), 600, "the run to end")

    s = state(run_dir)
    assert s["status"] == "completed", s
    assert s["job_ids"] == [job] and not s.get("resizes")  # no requeue, no shrink
    [restart] = s["restarts"]
    assert restart["kind"] == "failed" and restart["attempt"] == f"{job}.0"
    assert restart["reason"] == (
        "node n2 was lost (SLURM no longer hears from it); rank(s) 0, 1 ended with it"
    )
    assert attempt_hosts(run_dir, f"{job}.0.1") == {0: "n1", 1: "n1"}  # the full size, on the spare
    [resume] = events(run_dir, "resume")
    assert resume["step"] in (4, 8)
    seen = step_losses(run_dir)
    assert sorted({step for step, _ in seen}) == list(range(1, 13))
    for step, loss in seen:  # the steps run twice too: as the uninterrupted run's
        assert loss == pytest.approx(reference_twelve[step], rel=1e-5), step


def test_status_shows_pending_and_running_and_cancel_stops_the_run(submit):
    before = squeue_ids()
    done, run_dir = submit(["train.steps=400"])
    assert done.returncode == 0, done.stderr
    job = state(run_dir)["job_ids"][-1]
    assert job in squeue_ids() - before
    wait_for(lambda: heartbeat_step(run_dir) >= 2, 300, "the run to start stepping")
    shown = moectl("status", "--runs", str(run_dir.parent))
    assert (
        run_dir.name[:20] in shown.stdout
        and "running" in shown.stdout
        and "RUNNING" in shown.stdout
    )
    follow = subprocess.Popen(
        [sys.executable, "-m", "launch.cli", "logs", str(run_dir), "-f"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    cancelled = moectl("cancel", str(run_dir))
    assert cancelled.returncode == 0, cancelled.stderr
    out, _ = follow.communicate(timeout=60)  # `logs -f` ends by itself when the run does
    assert (
        "==== SLURM job" in out and "step 2/400" in out and out.rstrip().endswith("[run cancelled]")
    )
    assert state(run_dir)["status"] == "cancelled"
    wait_for(lambda: job not in squeue_ids(), 60, "the job to leave the queue")
    wait_for(lambda: not run_processes(run_dir), 60, "the ranks to exit")
    step = heartbeat_step(run_dir)
    time.sleep(3)
    assert heartbeat_step(run_dir) == step  # nothing trains any more
    assert state(run_dir)["status"] == "cancelled"  # the teardown did not requeue it


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--partition", "nosuch"], "unknown partition 'nosuch': this cluster has debug"),
        (
            ["parallel.data=4", "--nodes", "4"],
            "slurm.nodes=4 but partition 'debug' has only 2 node(s)",
        ),
        (["--nodes", "3"], "the run needs 2 ranks but 3 node(s) cannot hold them evenly"),
        (["--time", "1h"], "allowed formats are MM, MM:SS, HH:MM:SS"),
        (["slurm.nodez=2"], "slurm.nodez: unknown key; did you mean 'nodes'?"),
    ],
)
def test_bad_input_is_refused_before_anything_is_submitted(submit, tmp_path, flags, message):
    before = squeue_ids()
    done, run_dir = submit(["train.steps=2", "train.warmup_steps=1"], *flags)
    assert done.returncode == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    assert run_dir is None and not (tmp_path / "runs").exists()
    assert squeue_ids() == before


def test_missing_config_is_refused(slurm_cluster, tmp_path):
    done = moectl(
        "submit",
        "configs/tiny/nope.yaml",
        "--cluster",
        str(PROFILE),
        "--runs",
        str(tmp_path / "runs"),
    )
    assert done.returncode == 2
    assert "config file not found: configs/tiny/nope.yaml" in done.stderr
    assert not (tmp_path / "runs").exists()
