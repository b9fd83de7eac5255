"""MFU in the views (tokens/s x the planner's FLOPs per token over the GPUs' peak), the status
table's reading of a GPU run, and the W&B config check."""

from __future__ import annotations

import json
import sys

import pytest

from cluster import RunRecord, new_run_dir, write_record
from cluster.state import RunState
from moe_parallel.monitor.run_info import write_run_info
from moe_parallel.views.mfu import mfu, peak_flops
from moe_parallel.views.summary import last_step_record, summarize

FLOPS = 3.0e9  # training FLOPs per token
TOKENS_PER_S = 1.0e6


def _gpu_run(tmp_path, gpu: str, precision: str = "bf16"):
    run_dir = new_run_dir(tmp_path / "runs", "gpu-run")
    write_record(run_dir, RunRecord(backend="local", status=RunState.RUNNING, world_size=8))
    records = [
        {"step": 1, "loss": 5.0, "tokens_per_s": 1.0},
        {"event": "eval", "step": 1},
        {"step": 2, "loss": 4.5, "tokens_per_s": TOKENS_PER_S},
        {"event": "save_started"},
    ]
    (run_dir / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in records) + '{"step": 3, "loss"'
    )  # a line being written
    write_run_info(
        run_dir,
        {
            "device": "cuda",
            "gpu": gpu,
            "ranks": 8,
            "precision": precision,
            "vocab_size": 32000,
            "train_flops_per_token": FLOPS,
        },
    )
    return run_dir


def test_mfu_of_a_known_gpu(tmp_path):
    run_dir = _gpu_run(tmp_path, "NVIDIA H100 80GB HBM3")
    s = summarize(run_dir, RunRecord(backend="local", status=RunState.RUNNING, world_size=8))
    assert s.step == 2 and s.loss == 4.5  # the last complete step record, events skipped
    assert s.mfu == pytest.approx(TOKENS_PER_S * FLOPS / (8 * 989e12))
    assert s.mfu_text == f"{100 * TOKENS_PER_S * FLOPS / (8 * 989e12):.1f}%" and not s.notes
    assert peak_flops("NVIDIA H100 PCIe", "bf16") == 756e12  # longest name fragment wins
    assert peak_flops("NVIDIA A100-SXM4-80GB", "fp32") == 156e12  # TF32 for fp32 runs


def test_mfu_of_an_unknown_gpu_says_why_and_takes_a_peak(tmp_path, monkeypatch):
    monkeypatch.delenv("MOE_PARALLEL_PEAK_TFLOPS", raising=False)
    run_dir = _gpu_run(tmp_path, "Mystery Accelerator 9000")
    record = RunRecord(backend="local", status=RunState.RUNNING, world_size=8)
    s = summarize(run_dir, record)
    assert s.mfu is None and s.mfu_text == "?"
    assert "Mystery Accelerator 9000" in s.notes[0] and "--peak-tflops" in s.notes[0]
    s = summarize(run_dir, record, peak_tflops=100.0)
    assert s.mfu == pytest.approx(TOKENS_PER_S * FLOPS / (8 * 100e12)) and not s.notes


def test_cpu_runs_have_no_mfu():
    assert mfu(
        1000.0, {"device": "cpu", "ranks": 2, "precision": "fp32", "train_flops_per_token": 1e6}
    ) == (None, "-")
    assert mfu(1000.0, None) == (None, "-")


def test_last_step_record_reads_backwards_across_chunks(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [{"step": i, "loss": 1.0 / i, "pad": "x" * 300} for i in range(1, 200)]
    lines += [{"event": "eval", "step": 199, "pad": "y" * 5000}]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert last_step_record(path, chunk=256) == lines[-2]
    assert last_step_record(tmp_path / "absent.jsonl") == {}
    path.write_text('{"step": 1}\n{"step": 2, "loss": nope}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl: a line is not valid JSON"):
        last_step_record(path)


def test_wandb_without_the_package_is_a_config_error(monkeypatch):
    from moe_parallel.config.schema import LogConfig

    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed: find_spec -> None
    with pytest.raises(ValueError, match=r"log.wandb=true needs the wandb package.*pip install"):
        LogConfig(wandb=True)
    assert LogConfig(wandb=False).wandb is False
