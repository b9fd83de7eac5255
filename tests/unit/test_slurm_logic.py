"""The SLURM backend's pure logic: profiles, time limits, ports, and what happens after an attempt."""

from __future__ import annotations

import pytest

from cluster.env import EXIT_REQUEUE
from cluster.profile import ProfileError, load_profile, split_overrides, time_limit_seconds
from cluster.registry import Restart
from cluster.slurm_job import decide, derive_port
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


def test_ports_differ_across_restarts_and_jobs():
    ports = {derive_port(j, r) for j in (1, 2, 3) for r in (0, 1, 2)}
    assert len(ports) == 9 and all(15000 <= p < 45000 for p in ports)


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
