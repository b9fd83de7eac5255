"""A rank hung inside a collective: detected from the heartbeats, stacks dumped, recorded, the run
restarted from its checkpoint by the local backend, ending with the uninterrupted run's losses."""

from __future__ import annotations

import json
import re
from datetime import datetime

import psutil
import pytest

from cluster.registry import read_record
from cluster.state import RunState
from tests.conftest import TWELVE
from tests.integration.cluster_helpers import injected_hang

pytestmark = pytest.mark.integration

HANG_TIMEOUT = 10.0
HANG = [*TWELVE, "monitor.hang_timeout=10", "monitor.heartbeat_interval=1"]


def test_hung_rank_is_detected_dumped_recorded_and_the_run_resumes(train_run, reference_twelve):
    run = train_run(HANG, env={"MOE_PARALLEL_FAULT": "hang:rank=1:step=5:times=1"})
    assert run.code == 0, run.log(1)[-3000:]
    record = read_record(run.run_dir)
    assert record.status is RunState.COMPLETED

    # Recorded: one hang after step 4 (checkpoint interval 4), both ranks inside a collective.
    assert len(record.hangs) == 1, record.hangs
    hang = record.hangs[0]
    assert hang.step == 4 and hang.attempt == "local.0" and hang.hang_timeout_s == HANG_TIMEOUT
    assert hang.stacks_missing == []
    # The hung rank is recorded inside the very collective the fault blocked it in (rank 1 in
    # the traced wrapper); the other rank waits for it in the real one.
    injected = injected_hang(run.run_dir)
    assert hang.ranks[1]["collective"] == injected, (hang.ranks, injected)
    for r in hang.ranks:
        assert r["collective"] is not None, r
        assert 0 < r["in_collective_s"] <= hang.idle_s + 3, r  # entered after step 4's save
        assert r["heartbeat_age_s"] < 5, r  # a rank blocked in a collective still beats
        assert r["step"] == 4, r
    hung_rank = hang.ranks[1]
    assert hung_rank["phase"] in ("forward-backward", "optimizer", "data"), hung_rank

    # Detected within 2 x hang_timeout of the hang (which started after step 4 and its save).
    hung_since = float(re.search(r"hanging inside (\w+) since ([\d.]+)", run.log(1)).group(2))
    detected = datetime.fromisoformat(hang.at).timestamp()
    assert 0 < detected - hung_since <= 2 * HANG_TIMEOUT, detected - hung_since
    assert HANG_TIMEOUT <= hang.idle_s <= HANG_TIMEOUT + 5  # not before the timeout, nor long after

    # Every rank's stack file shows the collective: the traced wrapper it is blocked in.
    assert len(hang.stacks) == 2
    for rank, path in enumerate(hang.stacks):
        text = open(path).read()
        assert "moe_parallel/monitor/collectives.py" in text and "in wrapper" in text, text
        assert "Thread" in text  # faulthandler's all-threads dump
    assert "in inside_collective" in open(hang.stacks[1]).read()
    assert "HANG DETECTED" in run.log(0) and "HANG DETECTED" in run.log(1)

    # Restarted through the restart path, from the step-4 checkpoint, to the same losses.
    assert [(r.kind, r.step) for r in record.restarts] == [("failed", 4)]
    assert record.restarts[0].reason.startswith("hang: no rank finished a step for 10 s")
    assert run.event("resume")["step"] == 4
    losses = run.losses  # later records of a step (the rerun) win
    assert sorted(losses) == list(range(1, 13))
    for step, ref in reference_twelve.items():
        assert abs(losses[step] - ref) <= 1e-6 * abs(ref), (step, losses[step], ref)
    assert not any(
        psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
        for p in record.pids
    )
    # The restarted ranks wrote fresh heartbeats and ended in phase "done" at step 12.
    for rank in range(2):
        beat = json.loads((run.run_dir / "heartbeats" / f"rank{rank}.json").read_text())
        assert (beat["step"], beat["phase"]) == (12, "done")
