"""The tiny BTX plan end to end (`moectl btx run`) on local ranks: with a branch killed mid-way,
with the driver killed and resumed, with a branch that keeps failing (the SLURM and Ray clusters
run its branches in test_btx_plan_slurm.py and test_btx_plan_ray.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.integration.btx_helpers import PLAN, btx_state, plan_dir, short_plan, stage_run
from tests.integration.cluster_helpers import (
    assert_no_process_left,
    events,
    losses,
    moectl,
    wait_for,
)

pytestmark = pytest.mark.integration


def test_tiny_plan_branches_beat_the_seed_and_btx_beats_it_everywhere(local_plan):
    done, plan_run = local_plan
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((plan_run / "btx_report.json").read_text())
    seed = report["losses"]["seed"]
    for domain in ("code", "prose", "arithmetic"):
        branch = report["losses"][f"branch:{domain}"][domain]
        assert branch < seed[domain], (
            f"branch {domain}: {branch} not below the seed's {seed[domain]}"
        )
        btx = report["losses"]["btx"][domain]
        assert btx < seed[domain], f"BTX on {domain}: {btx} not below the seed's {seed[domain]}"
    assert "held-out loss" in done.stdout and "parallelism" in done.stdout  # printed by the run
    # The mix took the seed and the three branches, in the plan's expert order.
    mix = json.loads((stage_run(plan_run, "mix") / "mix.json").read_text())
    stages = btx_state(plan_run)["stages"]
    assert mix["experts"] == [
        stages[s]["checkpoint"]
        for s in ("seed", "branch:code", "branch:prose", "branch:arithmetic")
    ]
    assert report["timing"]["branch_parallelism"] > 1.2  # the branches overlapped


def test_killed_branch_resumes_from_its_checkpoint_and_the_others_never_go_back(local_plan):
    done, plan_run = local_plan
    assert done.returncode == 0, done.stdout[-3000:]
    stages = btx_state(plan_run)["stages"]
    code = stage_run(plan_run, "branch:code")
    assert stages["branch:code"]["attempts"] == 2
    assert [e["step"] for e in events(code, "resume")] == [10]  # its own step-10 checkpoint
    assert max(losses(code)) == 30
    for other in ("prose", "arithmetic"):
        assert stages[f"branch:{other}"]["attempts"] == 1
        run = stage_run(plan_run, f"branch:{other}")
        steps = [
            json.loads(line)["step"]
            for line in (run / "metrics.jsonl").read_text().splitlines()
            if "event" not in json.loads(line)
        ]
        assert steps == list(range(1, 31)), f"{other}: steps {steps}"
        assert events(run, "resume") == []


def test_killed_driver_resumes_without_retraining_finished_branches(
    local_plan, tmp_path, data_cache
):
    _, first = local_plan
    seed = btx_state(first)["stages"]["seed"]["checkpoint"]
    # prose is short, so it is finished while the others are still training when the driver dies.
    overrides = [
        *short_plan(seed, data_cache, branch_steps=24),
        "domains.prose.overrides=[train.steps=6]",
    ]
    # Every step sleeps 300 ms (test-only fault), so that on a fast machine code still has
    # seconds of steps left when prose is done (without it the race was lost on a quiet machine).
    driver = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "launch.cli",
            "btx",
            "run",
            str(PLAN),
            *overrides,
            "--runs",
            str(tmp_path),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "MOE_PARALLEL_FAULT": "slow:rank=0:ms=300"},
    )

    def driver_alive():
        if driver.poll() is not None:
            raise AssertionError(f"the driver ended early:\n{driver.stdout.read()[-3000:]}")
        return True

    plan_run = wait_for(
        lambda: driver_alive() and next(tmp_path.glob("btx-tiny-*"), None),
        60,
        "the plan run directory",
    )

    def prose_done_others_running():
        driver_alive()
        stages = btx_state(plan_run)["stages"] if (plan_run / "btx.json").is_file() else {}
        return (
            stages.get("branch:prose", {}).get("state") == "done"
            and stages.get("branch:code", {}).get("state") == "running"
        )

    wait_for(prose_done_others_running, 300, "prose done while code still trains")
    code_run = stage_run(plan_run, "branch:code")
    wait_for(lambda: (code_run / "checkpoints" / "latest").is_file(), 300, "a code checkpoint")
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    assert_no_process_left(code_run)  # the ranks died with their driver
    status = moectl("btx", "status", str(plan_run))
    assert "driver: not running" in status.stdout and "btx resume" in status.stdout, status.stdout
    prose_run = stage_run(plan_run, "branch:prose")
    prose_metrics = (prose_run / "metrics.jsonl").read_text()

    resumed = moectl("btx", "resume", str(plan_run), timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    stages = btx_state(plan_run)["stages"]
    assert (
        stages["branch:prose"]["attempts"] == 1 and stage_run(plan_run, "branch:prose") == prose_run
    )
    assert (prose_run / "metrics.jsonl").read_text() == prose_metrics  # not retrained
    assert events(code_run, "resume") and events(code_run, "resume")[0]["step"] >= 4
    assert max(losses(code_run)) == 24
    assert btx_state(plan_run)["status"] == "completed"


def test_branch_that_keeps_failing_is_reported_and_the_mix_waits(local_plan, tmp_path, data_cache):
    seed = btx_state(local_plan[1])["stages"]["seed"]["checkpoint"]
    env = {"MOE_PARALLEL_BTX_FAULT": "prose=kill:rank=0:step=5"}  # every attempt dies at step 5
    done = moectl(
        "btx",
        "run",
        str(PLAN),
        *short_plan(seed, data_cache),
        "branches.max_restarts=1",
        "--runs",
        str(tmp_path),
        env=env,
        timeout=900,
    )
    assert done.returncode == 3, done.stdout[-3000:] + done.stderr[-3000:]
    plan_run = plan_dir(done.stdout)
    state = btx_state(plan_run)
    assert state["status"] == "waiting" and "branch" in state["message"]
    assert state["stages"]["branch:prose"]["state"] == "failed"
    assert state["stages"]["branch:prose"]["attempts"] == 2  # the first run and one restart
    assert "killed by signal SIGKILL" in state["stages"]["branch:prose"]["message"]
    for other in ("code", "arithmetic"):  # the others finished regardless
        assert state["stages"][f"branch:{other}"]["state"] == "done"
        assert max(losses(stage_run(plan_run, f"branch:{other}"))) == 8
    assert "mix" not in state["stages"]
    # Fixed (no fault any more): resume trains prose on from its checkpoint and finishes the plan.
    resumed = moectl("btx", "resume", str(plan_run), timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    prose = stage_run(plan_run, "branch:prose")
    assert [e["step"] for e in events(prose, "resume")][-1] == 4 and max(losses(prose)) == 8


def test_data_prepare_makes_the_plans_tokenizer_and_domains(data_cache):
    done = moectl("data", "prepare", str(PLAN), f"cache_dir={data_cache}")
    assert done.returncode == 0, done.stderr[-2000:]
    prepared = json.loads(done.stdout)
    assert sorted(prepared["prefixes"]) == ["arithmetic", "code", "prose"]
    assert Path(prepared["tokenizer"]).is_file()
    assert all(
        Path(p + ".bin").is_file() and prepared["tokens"][d] > 50_000
        for d, p in prepared["prefixes"].items()
    )


def test_bad_plan_is_refused_before_anything_runs(tmp_path):
    done = moectl("btx", "run", str(PLAN), "mix.seed_expert=false", "--runs", str(tmp_path))
    assert done.returncode == 2
    assert "num_experts=4 but the plan makes 3 experts (code, prose, arithmetic)" in done.stderr
    assert not list(tmp_path.iterdir())
