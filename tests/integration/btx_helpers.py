"""The tiny BTX plan's helpers for its tests: reading a plan run, a short plan from a seed, and
the whole plan on local ranks that the local, SLURM and Ray tests share (built once a run)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.conftest import REPO, built_once
from tests.integration.cluster_helpers import moectl

PLAN = REPO / "configs" / "btx" / "tiny.yaml"
QUIET = "log.tensorboard=false"


def plan_dir(stdout: str) -> Path:
    for line in stdout.splitlines():
        if line.startswith("plan run directory: "):
            return Path(line.split(": ", 1)[1])
    raise AssertionError(f"no plan run directory in:\n{stdout}")


def btx_state(plan_run: Path) -> dict:
    return json.loads((plan_run / "btx.json").read_text())


def stage_run(plan_run: Path, stage: str) -> Path:
    return Path(btx_state(plan_run)["stages"][stage]["run_dir"])


def short_plan(seed_ckpt: Path, data_cache: Path, branch_steps: int = 8) -> list[str]:
    """The tiny plan from an existing seed, with short branches and finetune."""
    return [
        f"cache_dir={data_cache}",
        f"seed.checkpoint={seed_ckpt}",
        f"branches.overrides=[train.steps={branch_steps},checkpoint.interval=4,{QUIET}]",
        f"finetune.overrides=[train.steps=4,{QUIET}]",
        "eval.batches=1",
    ]


def run_plan_on(
    backend: str,
    flags: list[str],
    seed: str,
    data_cache: Path,
    tmp_path: Path,
    env: dict | None = None,
) -> Path:
    """The short plan from ``seed`` with branches and finetune on ``backend``; asserts that each
    branch ran there and beat the seed on its domain, and returns the plan run directory."""
    done = moectl(
        "btx",
        "run",
        str(PLAN),
        *short_plan(seed, data_cache),
        *flags,
        "--backend",
        backend,
        "--runs",
        str(tmp_path),
        env=env,
        timeout=1200,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    plan_run = plan_dir(done.stdout)
    report = json.loads((plan_run / "btx_report.json").read_text())
    for domain in ("code", "prose", "arithmetic"):
        run = stage_run(plan_run, f"branch:{domain}")
        record = json.loads((run / "state.json").read_text())
        assert record["backend"] == backend and record["job_ids"], record
        assert report["losses"][f"branch:{domain}"][domain] < report["losses"]["seed"][domain]
    finetune = json.loads((stage_run(plan_run, "finetune") / "state.json").read_text())
    assert finetune["backend"] == backend and finetune["status"] == "completed"
    return plan_run


def whole_local_plan(tmp_path_factory, data_cache) -> tuple[subprocess.CompletedProcess, Path]:
    """The whole tiny plan on local ranks, the code branch killed (SIGKILL) after step 12: run
    by the first xdist worker that needs it, read by the others (the local tests check the plan,
    the SLURM and Ray tests start their branches from its seed)."""

    def build() -> dict:
        runs = tmp_path_factory.mktemp("btx-local")
        done = moectl(
            "btx",
            "run",
            str(PLAN),
            f"cache_dir={data_cache}",
            f"seed.overrides=[parallel.data=1,train.steps=40,checkpoint.interval=20,{QUIET}]",
            f"branches.overrides=[train.steps=30,checkpoint.interval=10,{QUIET}]",
            f"finetune.overrides=[train.steps=30,{QUIET}]",
            "--runs",
            str(runs),
            env={"MOE_PARALLEL_BTX_FAULT": "code=kill:rank=0:step=12:times=1"},
            timeout=1200,
        )
        return {"returncode": done.returncode, "stdout": done.stdout, "stderr": done.stderr}

    done = subprocess.CompletedProcess([], **built_once(tmp_path_factory, "btx-local-plan", build))
    return done, plan_dir(done.stdout)
