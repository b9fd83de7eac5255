"""``moectl doctor`` on a CPU machine: the parts that run on CPU ranks (tiny shapes) pass with
figures that check out, the GPU parts say they need a GPU."""

from __future__ import annotations

import json
import math
import os
import re

import pytest

from moe_parallel.bench.doctor import CLOCK_RANGE, STEP_JOB
from tests.integration.cluster_helpers import moectl

pytestmark = pytest.mark.integration


def parts(stdout: str) -> dict[str, tuple[str, dict[str, str]]]:
    """``<part>: <status> k=v ...`` lines -> {part: (status, figures)}."""
    out = {}
    for line in stdout.splitlines():
        found = re.match(r"^(\w+): (passed|failed|needs a GPU|needs Transformer Engine)(.*)$", line)
        if found:
            out[found[1]] = (found[2], dict(re.findall(r"(\w+)=(\S+)", found[3])))
    return out


def first_loss(run_dir) -> float:
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("step") == 1 and "lm_loss" in record:
            return record["lm_loss"]
    raise AssertionError(f"no step 1 in {run_dir}/metrics.jsonl")


def test_doctor_on_cpu(tmp_path):
    cpu = {"MOE_PARALLEL_DEVICE": "cpu", "MOE_PARALLEL_RUNS": str(tmp_path / "reference")}
    done = moectl("doctor", "--runs", str(tmp_path / "doctor"), env=cpu)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.splitlines()[-1] == "doctor_failed=0"
    found = parts(done.stdout)
    for gpu_part in ("te_spec", "fp8", "checkpoint_save_gpu"):
        assert found[gpu_part][0] == "needs a GPU"
    status, versions = found["versions"]
    assert status == "passed" and versions["cuda"] == "absent" and versions["nccl"] == "absent"
    # Never imported on CPU: absent, or installed and left alone.
    assert versions["transformer_engine"] in ("absent", "installed_not_imported_on_CPU")

    status, step = found["training_step"]
    assert status == "passed" and step["device"] == "cpu" and step["layers"] == "4"
    loss = float(step["loss"])
    # The same first step through `moectl train` on one rank (a run of its own) has this loss.
    reference = moectl("train", "configs/tiny/moe_tiny.yaml", *STEP_JOB, env=cpu)
    assert reference.returncode == 0, reference.stderr[-3000:]
    (run_dir,) = (tmp_path / "reference").iterdir()
    assert math.isfinite(loss) and math.isclose(loss, first_loss(run_dir), rel_tol=1e-5)
    assert 0 < float(step["mfu"]) < 1 and float(step["step_s"]) > 0
    # No shipped profile for a CPU: the planner's part says how to get one.
    assert step["planner"] == "needs_a_calibrated_profile(moectl_plan_calibrate)"
    assert "planner_step_s" not in step

    status, clock = found["step_clock"]
    assert status == "passed" and clock["clock"] == "host"
    assert CLOCK_RANGE[0] <= float(clock["clock_over_step"]) <= CLOCK_RANGE[1]

    assert found["checkpoint_save_cpu"][0] == "passed"
    status, load = found["checkpoint_load_cpu"]
    # 2 CPU ranks (EP2) load the 1-rank save: each rank's 23 shared tensors and its 16 experts'.
    assert status == "passed" and load["ranks"] == "2" and load["loaded_step"] == "2"
    assert (load["compared"], load["differ"], load["missing"]) == ("78", "0", "0")
    assert os.path.isdir(tmp_path / "doctor")
