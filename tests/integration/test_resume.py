"""Resume and resharding through the real entry, real checkpoints and the local backend."""

from __future__ import annotations

import json
from datetime import datetime

import psutil
import pytest

pytestmark = pytest.mark.integration

TEN = ["train.steps=10", "train.warmup_steps=2", "checkpoint.interval=5", "train.precision=fp32"]


def test_killed_run_resumes_loss_for_loss(train_run):
    straight = train_run([*TEN, "checkpoint.keep_last=1"])
    assert straight.code == 0, straight.log()
    kept = sorted(p.name for p in (straight.run_dir / "checkpoints").iterdir())
    assert kept == ["latest", "step_00000010"]  # step 5 pruned by keep_last=1

    killed = train_run(TEN, env={"MOE_PARALLEL_FAULT": "kill:rank=1:step=7"})
    assert killed.code != 0
    state = json.loads((killed.run_dir / "state.json").read_text())
    assert state["status"] == "failed"
    assert state["failure"]["rank"] == 1 and state["failure"]["signal"] == "SIGKILL"
    # The survivors were stopped promptly: the run ended within 30 s of the last step logged.
    last_step_at = (killed.run_dir / "metrics.jsonl").stat().st_mtime
    ended = datetime.fromisoformat(state["ended_at"]).timestamp()
    assert ended - last_step_at < 30
    assert not any(
        psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
        for p in state["pids"]
    )
    assert max(killed.losses) == 7
    assert (killed.run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000005"

    resumed = train_run(resume=str(killed.run_dir))
    assert resumed.code == 0, resumed.log()
    assert "resumed from" in resumed.log() and "step_00000005" in resumed.log()
    final = {r["step"]: r for r in resumed.steps}  # later records of a step win
    for step in range(6, 11):
        a, b = final[step], {r["step"]: r for r in straight.steps}[step]
        assert abs(a["loss"] - b["loss"]) <= 1e-6 * abs(b["loss"]), (step, a["loss"], b["loss"])
        assert a["lr"] == b["lr"], step
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-6)
    assert resumed.event("resume")["resume_loss"] == pytest.approx(final[6]["loss"], rel=1e-6)
