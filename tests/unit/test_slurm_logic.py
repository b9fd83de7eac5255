"""The SLURM backend's pure logic: profiles, time limits, ports, and what happens after an attempt."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster import slurm, slurm_job
from cluster.backend import RunSpec
from cluster.elastic import ElasticSpec
from cluster.env import EXIT_REQUEUE
from cluster.profile import ProfileError, load_profile, split_overrides, time_limit_seconds
from cluster.registry import Restart
from cluster.slurm import Partition, SlurmBackend, check_profile
from cluster.slurm_job import (
    STEP_ENV,
    STEP_NODES_ENV,
    Attempt,
    Capacity,
    SlurmTaskEnv,
    decide,
    derive_port,
    first_step_nodes,
    next_step_in_allocation,
    parse_node_states,
    step_command,
    step_shape,
    usable,
)
from cluster.state import RunState


@pytest.mark.parametrize(
    "text,seconds",
    [
        ("30", 1800),
        ("30:10", 1810),
        ("1:00:00", 3600),
        ("2-3", 183600),
        ("2-3:04", 183840),
        ("2-03:04:05", 183845),
    ],
)
def test_time_limits_in_every_slurm_format(text, seconds):
    assert time_limit_seconds(text) == seconds


@pytest.mark.parametrize("text", ["1h", "", "0", "a:b", "1:2:3:4", "-5"])
def test_bad_time_limits_name_the_allowed_formats(text):
    with pytest.raises(ValueError, match="allowed formats|longer than zero"):
        time_limit_seconds(text)


def test_profile_errors_name_the_field():
    with pytest.raises(
        ProfileError, match=r"slurm.partiton: unknown key; did you mean 'partition'"
    ):
        load_profile(None, ["slurm.partiton=x"])
    with pytest.raises(ProfileError, match=r"slurm.time: .*allowed formats"):
        load_profile(None, ["slurm.time=2hours"])
    with pytest.raises(ProfileError, match="signal_delay_s=600 must be shorter"):
        load_profile(None, ["slurm.time=5", "slurm.signal_delay_s=600"])
    with pytest.raises(ProfileError, match="slurm.nodes: Input should be greater"):
        load_profile(None, ["slurm.nodes=0"])
    with pytest.raises(ProfileError, match="file not found"):
        load_profile("configs/clusters/nope.yaml")


def test_ranks_must_fill_the_nodes():
    profile = load_profile(None, ["slurm.nodes=2"]).slurm
    assert profile.ranks_on_each_node(4) == 2
    with pytest.raises(ProfileError, match="needs 3 ranks"):
        profile.ranks_on_each_node(3)
    gpus = load_profile(None, ["slurm.gpus_per_node=1"]).slurm
    with pytest.raises(ProfileError, match="one GPU per rank"):
        gpus.ranks_on_each_node(2)


def test_overrides_are_routed_to_the_profile_or_the_run():
    run, profile = split_overrides(["train.steps=5", "slurm.nodes=2", "backend=slurm", "name=x"])
    assert run == ["train.steps=5", "name=x"]
    assert profile == ["slurm.nodes=2", "backend=slurm"]


def test_ports_differ_across_restarts_jobs_and_steps():
    ports = {derive_port(j, r, s) for j in (1, 2, 3) for r in (0, 1, 2) for s in (0, 1)}
    assert len(ports) == 18 and all(15000 <= p < 45000 for p in ports)
    assert derive_port(7, 1) == derive_port(7, 1, 0)  # step 0: the port it always had


def _ranks(*codes, signal=None):
    return {
        r: {"rank": r, "exit_code": c, "signal": signal if c is None else None, "ended": 100.0 + r}
        for r, c in enumerate(codes)
    }


def test_all_ranks_done_is_completed():
    d = decide(_ranks(0, 0), 2, [], 2, 40)
    assert d.status is RunState.COMPLETED


def test_all_ranks_checkpointed_on_a_signal_is_a_requeue_not_a_failure():
    d = decide(
        _ranks(EXIT_REQUEUE, EXIT_REQUEUE), 2, [Restart("t", "x", "1.0", "failed", 3)] * 5, 2, 17
    )
    assert (d.status, d.kind) == (RunState.REQUEUED, "preempted")
    assert "after step 17" in d.reason


def test_a_killed_rank_is_requeued_and_named():
    ranks = _ranks(0, None, signal="SIGKILL")
    ranks[0]["exit_code"] = 1  # killed by srun after rank 1 died: ended later
    ranks[1]["ended"] = 50.0
    d = decide(ranks, 2, [], 2, 7)
    assert (d.status, d.kind) == (RunState.REQUEUED, "failed")
    assert d.reason == "rank 1 was killed by signal SIGKILL"
    assert d.failure.rank == 1


def test_a_lost_rank_without_record_is_a_failure():
    d = decide({0: {"rank": 0, "exit_code": EXIT_REQUEUE, "ended": 1.0}}, 2, [], 2, 7)
    assert d.status is RunState.REQUEUED and "rank 1 ended without a record" in d.reason


def test_restarts_stop_at_max_restarts():
    before = [
        Restart("t", "rank 0 exited with code 1", f"1.{i}", "failed", 10 * i) for i in range(2)
    ]
    d = decide(_ranks(1, 0), 2, before, 2, 30)
    assert (d.status, d.kind) == (RunState.FAILED, "gave_up")
    assert "max_restarts=2" in d.reason


def test_the_same_failure_at_the_same_step_does_not_loop():
    before = [Restart("t", "rank 0 exited with code 1", "1.0", "failed", 12)]
    d = decide(_ranks(1, 0), 2, before, 5, 12)
    assert (d.status, d.kind) == (RunState.FAILED, "gave_up")
    assert "same failure" in d.reason
    # The same failure after progress is restarted (a flaky node, not a deterministic crash).
    assert decide(_ranks(1, 0), 2, before, 5, 20).status is RunState.REQUEUED
    # Preemptions do not count as failures.
    preempted = [Restart("t", "stopped", f"1.{i}", "preempted", 12) for i in range(9)]
    assert decide(_ranks(1, 0), 2, preempted, 1, 12).status is RunState.REQUEUED


def test_a_hang_stopped_by_the_tasks_is_the_restart_reason_and_is_not_retried_twice():
    hang = "hang: no rank finished a step for 20 s after step 4"
    ranks = {
        0: {"rank": 0, "exit_code": None, "signal": "SIGKILL", "ended": 2.0, "hang": hang},
        1: {"rank": 1, "exit_code": None, "signal": "SIGKILL", "ended": 1.0, "hang": hang},
    }
    d = decide(ranks, 2, [], 3, 4)
    assert d.status is RunState.REQUEUED and d.reason == hang
    again = decide(ranks, 2, [Restart("t", hang, "1.0", "failed", 4)], 3, 4)
    assert again.status is RunState.FAILED  # the same hang at the same step: not looped


# ---------------------------------------------------------------------------------------------
# Elastic runs: a lost node, a smaller srun step, grow back through a requeue
# ---------------------------------------------------------------------------------------------
def test_a_lost_node_names_the_node_and_the_ranks_that_ended_with_it():
    ranks = {0: {"rank": 0, "exit_code": 1, "ended": 1.0}}
    d = decide(ranks, 2, [], 2, 6, lost_nodes=("n2",))
    assert (d.status, d.kind) == (RunState.REQUEUED, "failed")
    assert d.reason == "node n2 was lost (SLURM no longer hears from it); rank(s) 1 ended with it"
    assert d.failure.rank == 0  # the first record with a failure, as for any failure


def test_ranks_stopped_to_grow_back_are_a_resize_not_a_preemption():
    d = decide(_ranks(EXIT_REQUEUE), 1, [], 2, 8, grow_back=True)
    assert (d.status, d.kind) == (RunState.REQUEUED, "resized")
    assert d.reason == "stopped at the checkpoint of step 8 to grow back: the capacity came back"
    assert decide(_ranks(0), 1, [], 2, 16, grow_back=True).status is RunState.COMPLETED


@pytest.mark.parametrize(
    "counts,per_replica,nodes,per_node,shape",
    [
        ((2, 1), 1, 1, 1, (1, 1)),  # DP2 on two hosts, one lost: DP1 on the host left
        ((4, 3, 2, 1), 2, 2, 2, (2, 2)),  # 8 ranks on 4 nodes of 2, two left: 2 replicas
        ((4, 3, 2, 1), 2, 3, 2, (3, 3)),  # 6 ranks on 3 nodes of 2
        ((3, 1), 1, 2, 2, (1, 1)),  # 3 ranks cannot spread evenly over 2 nodes of 2
        ((2,), 2, 1, 2, None),  # no allowed size fits one node
    ],
)
def test_a_smaller_step_takes_the_largest_size_spread_evenly(
    counts, per_replica, nodes, per_node, shape
):
    elastic = ElasticSpec(per_replica, counts, 0.0)
    assert step_shape(elastic, nodes, per_node) == shape


@pytest.mark.parametrize(
    "state,ok",
    [
        ("idle", True),
        ("allocated", True),
        ("mixed", True),
        ("allocated*", False),  # not responding
        ("idle*", False),
        ("down*", False),
        ("drained", False),
        ("draining", False),
        ("", False),
        (None, False),
    ],
)
def test_a_node_is_usable_when_it_answers_and_is_not_down(state, ok):
    assert usable(state) is ok


def test_sinfo_node_states_are_read_per_node():
    assert parse_node_states("n1 allocated\nn2 down*\n\n") == {"n1": "allocated", "n2": "down*"}


def test_the_smaller_step_gives_its_shape_and_runs_the_submitted_task():
    job = {"profile": {"python": "/opt/env/bin/python -X utf8"}}
    attempt = Attempt(41, 0, 2, step=1, nodes=("n1", "n3"), replicas=2)
    argv = step_command(job, attempt, Path("/runs/r/slurm/submitit"))
    assert argv[0] == "srun" and {"--kill-on-bad-exit=1", "--overlap"} <= set(argv)
    assert {"--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--nodelist=n1,n3"} <= set(argv)
    assert argv[-7:] == [
        "/opt/env/bin/python",
        "-X",
        "utf8",
        "-u",
        "-m",
        "submitit.core._submit",
        "/runs/r/slurm/submitit",
    ]
    assert attempt.name == "41.0.1" and Attempt(41, 2, 2).name == "41.2"


def test_a_later_step_s_task_takes_its_size_and_hosts_from_the_step():
    env = {
        "SLURM_JOB_ID": "41",
        "SLURM_RESTART_COUNT": "0",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NTASKS": "1",
        "SLURM_STEP_NUM_TASKS": "1",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_JOB_NODELIST": "n[1-2]",
        STEP_ENV: "1",
        STEP_NODES_ENV: "n1",
    }
    task = SlurmTaskEnv.from_environ(env)
    assert (task.world_size, task.nodes, task.hostnames, task.ranks_per_node) == (1, 1, ("n1",), 1)
    assert task.attempt == "41.0.1"


# Spare nodes (slurm.spare_nodes): the job holds nodes + spares, its ranks run on `nodes`.
def spare_job(elastic: ElasticSpec | None = None) -> dict:
    """Four ranks on two nodes of two, one spare node."""
    return {
        "world_size": 4,
        "ranks_per_node": 2,
        "elastic": elastic.to_dict() if elastic else None,
        "profile": {"nodes": 2, "spare_nodes": 1},
    }


def failed_ranks(world: int) -> dict[int, dict]:
    return {r: {"rank": r, "exit_code": 1, "ended": "x"} for r in range(world)}


@pytest.fixture
def cluster_of(monkeypatch):
    """cluster_of(own, down): the job's nodes that answer SLURM, and those it lost; the
    teardown runs on n1 (the batch host)."""

    def set_nodes(own: tuple[str, ...], down: tuple[str, ...]) -> None:
        states = {**{n: "allocated" for n in own}, **{n: "down*" for n in down}}
        monkeypatch.setattr(slurm_job, "node_states", lambda selection: states)
        monkeypatch.setattr(slurm_job, "job_capacity", lambda job_id: Capacity(own, ()))
        monkeypatch.setattr(slurm_job.socket, "gethostname", lambda: "n1")

    return set_nodes


@pytest.mark.parametrize("elastic", [None, ElasticSpec(2, (2, 1), 0.0)])
def test_a_lost_node_is_replaced_by_a_spare_in_a_full_size_step(cluster_of, elastic):
    cluster_of(own=("n1", "n3"), down=("n2",))
    attempt = Attempt(41, 0, 4, nodes=("n2", "n3"))
    lost, going_on = next_step_in_allocation(spare_job(elastic), attempt, failed_ranks(4))
    assert lost == ("n2",)
    # full size at once, the batch host n1 last; an elastic run keeps its full data-parallel size
    assert going_on == Attempt(41, 0, 4, 1, ("n3", "n1"), 2 if elastic else None)


def test_without_enough_nodes_left_a_spare_run_is_requeued_or_shrinks(cluster_of):
    cluster_of(own=("n3",), down=("n1", "n2"))
    attempt = Attempt(41, 0, 4, nodes=("n2", "n3"))
    assert next_step_in_allocation(spare_job(), attempt, failed_ranks(4)) == (("n2",), None)
    elastic = spare_job(ElasticSpec(2, (2, 1), 0.0))
    lost, going_on = next_step_in_allocation(elastic, attempt, failed_ranks(4))
    assert going_on == Attempt(41, 0, 2, 1, ("n3",), 1)  # one replica on the node left


def test_a_failure_without_a_lost_node_is_requeued_as_without_spares(cluster_of):
    cluster_of(own=("n1", "n2", "n3"), down=())
    attempt = Attempt(41, 0, 4, nodes=("n2", "n3"))
    assert next_step_in_allocation(spare_job(), attempt, failed_ranks(4)) == ((), None)


def test_the_first_step_runs_after_the_spares(monkeypatch):
    monkeypatch.setattr(slurm_job, "hostnames", lambda nodelist: ("n1", "n2", "n3"))
    assert first_step_nodes(spare_job(), "n[1-3]") == ("n2", "n3")
    assert first_step_nodes({**spare_job(), "profile": {"nodes": 3}}, "n[1-3]") == ()


def test_a_job_with_spares_allocates_them_and_runs_its_ranks_on_the_rest(tmp_path, monkeypatch):
    profile = load_profile(None, ["slurm.nodes=2", "slurm.spare_nodes=1"]).slurm
    spec = RunSpec(run_dir=tmp_path, world_size=4, entry=["python"])
    params = SlurmBackend(profile).sbatch_parameters(tmp_path, spec, 2)
    assert params["nodes"] == 3 and params["additional_parameters"]["no-kill"] is True
    assert params["srun_args"][-4:] == [
        "--nodes=2",
        "--ntasks=4",
        "--ntasks-per-node=2",
        "--relative=1",
    ]
    monkeypatch.setattr(slurm, "partitions", lambda: {"debug": Partition("debug", 2, True, True)})
    with pytest.raises(ProfileError, match=r"^slurm.nodes=2 \+ slurm.spare_nodes=1 but partition"):
        check_profile(profile)


def test_a_first_step_on_some_of_the_job_s_nodes_takes_its_hosts_from_the_step(monkeypatch):
    monkeypatch.setattr(slurm_job, "hostnames", lambda nodelist: {"n[2-3]": ("n2", "n3")}[nodelist])
    env = {
        "SLURM_JOB_ID": "41",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NTASKS": "6",
        "SLURM_STEP_NUM_TASKS": "4",
        "SLURM_JOB_NUM_NODES": "3",
        "SLURM_STEP_NUM_NODES": "2",
        "SLURM_JOB_NODELIST": "n[1-3]",
        "SLURM_STEP_NODELIST": "n[2-3]",
    }
    task = SlurmTaskEnv.from_environ(env)
    assert (task.world_size, task.nodes, task.hostnames, task.ranks_per_node) == (
        4,
        2,
        ("n2", "n3"),
        2,
    )
