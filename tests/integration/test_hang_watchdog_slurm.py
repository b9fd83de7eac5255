"""The hang watchdog in the SLURM tasks, on the real local SLURM cluster (two simulated hosts):
a rank hung inside a collective is detected by the tasks' watchdogs, every rank's stacks are
dumped, rank 0's task records the hang, the ranks are stopped and the job requeued from the
checkpoint; the run ends with the uninterrupted run's losses."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import TWELVE
from tests.integration.cluster_helpers import (
    assert_no_process_left,
    events,
    injected_hang,
    losses,
    state,
)
from tests.integration.test_slurm import submit  # noqa: F401  (the fixture)

pytestmark = pytest.mark.integration


def test_slurm_tasks_detect_a_hang_and_requeue(submit, reference_twelve):  # noqa: F811
    done, run_dir = submit(
        [*TWELVE, "monitor.hang_timeout=10", "monitor.heartbeat_interval=1"],
        "--wait",
        env={"MOE_PARALLEL_FAULT": "hang:rank=1:step=5:times=1"},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    s = state(run_dir)
    assert s["status"] == "completed"
    [hang] = s["hangs"]
    assert hang["step"] == 4 and hang["stacks_missing"] == []
    assert 10 <= hang["idle_s"] <= 20  # detected within 2 x hang_timeout
    assert all(r["collective"] is not None for r in hang["ranks"]), hang["ranks"]
    # The hung rank is recorded inside the collective the fault blocked it in.
    assert hang["ranks"][1]["collective"] == injected_hang(run_dir), hang["ranks"]
    for path in hang["stacks"]:
        text = Path(path).read_text()
        assert "moe_parallel/monitor/collectives.py" in text and "in wrapper" in text
    [restart] = s["restarts"]
    assert restart["kind"] == "failed" and restart["step"] == 4
    assert restart["reason"].startswith("hang: no rank finished a step for 10 s")
    [resume] = events(run_dir, "resume")
    assert resume["step"] == 4
    got = losses(run_dir)
    for step, loss in reference_twelve.items():
        assert got[step] == pytest.approx(loss, rel=1e-5), step
    assert_no_process_left(run_dir)
