"""The README's first command, run exactly as written: tiny MoE pretraining on local CPU ranks."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.integration


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    block = re.search(r"```(?:bash|sh)\n(.*?)```", text, re.S)
    assert block, "README.md has no shell block"
    return [line for line in block.group(1).splitlines() if line and not line.startswith("#")]


def test_readme_starts_with_train_then_test_command():
    train, test = readme_commands()
    assert train.startswith("pip install torch==2.13.0 -e . && moectl train configs/tiny/")
    assert test == "bash .ci/run"


def test_readme_train_command_learns_and_checkpoints(tmp_path):
    command = readme_commands()[0].split("&&", 1)[1]  # the install part is .ci/run's job here
    env = {**os.environ, "MOE_PARALLEL_RUNS": str(tmp_path)}
    done = subprocess.run(
        shlex.split(command), cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "step 40/40" in done.stdout  # rank 0's progress reaches the terminal
    (run_dir,) = tmp_path.iterdir()
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "event" not in r]
    assert len(losses) == 40
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.5, (first, last)
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000040"
    meta = json.loads((run_dir / "checkpoints" / "step_00000040" / "meta.json").read_text())
    assert meta["step"] == 40 and meta["consumed_samples"] == 40 * 8
    assert json.loads((run_dir / "state.json").read_text())["status"] == "completed"
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
