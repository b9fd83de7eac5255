"""Megatron's import without TorchDynamo, Inductor and W&B, and the compile it defers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from moe_parallel.runtime.megatron_import import lazy_compile
from tests.conftest import REPO

PROBE = """
import json, sys
import moe_parallel, megatron.core
from megatron.core import jit
import megatron.core.fusions.fused_bias_gelu  # decorated with jit_fuser at import
import torch
before = {m: m in sys.modules for m in ("torch._dynamo", "torch._inductor", "wandb")}
double = jit.jit_fuser(lambda x: 2 * x, backend="eager")
after_decorating = "torch._dynamo" in sys.modules
out = double(torch.ones(3))  # the real torch.compile runs here, at the first call
import wandb
print(json.dumps({"before": before, "lazy": jit.jit_fuser.__qualname__,
                  "compile_restored": torch.compile.__module__,
                  "dynamo_after_decorating": after_decorating,
                  "dynamo_after_call": "torch._dynamo" in sys.modules,
                  "out": out.tolist(), "wandb_real": hasattr(wandb, "init")}))
"""


def test_megatron_imports_without_dynamo_inductor_or_wandb_and_compiles_at_the_first_call():
    env = {k: v for k, v in os.environ.items() if k != "MOE_PARALLEL_DEVICE"}  # GPU ranks' path
    done = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["before"] == {"torch._dynamo": False, "torch._inductor": False, "wandb": False}
    assert got["lazy"].startswith("lazy_compile")
    assert got["compile_restored"] == "torch"  # torch.compile itself is untouched afterwards
    assert got["dynamo_after_decorating"] is False
    assert got["dynamo_after_call"] is True and got["out"] == [2.0, 2.0, 2.0]
    assert got["wandb_real"] is True  # hidden from Megatron only, importable afterwards


def test_cpu_ranks_run_megatrons_fused_functions_uncompiled():
    """On CPU ranks the fusions are never compiled (measured: the losses are bit-identical to
    compiled ones there, and compiling cost each rank ~1.3 s at its first routing step)."""
    probe = (
        "import moe_parallel, megatron.core, sys\n"
        "from megatron.core import jit\n"
        "f = lambda x: x\n"
        "print(jit.jit_fuser(f) is f, 'torch._dynamo' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "MOE_PARALLEL_DEVICE": "cpu"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-2:] == ["True", "False"]


def test_lazy_compile_defers_functions_and_hands_modules_to_the_real_compile():
    calls = []

    def real(model, **options):
        calls.append((model, options))
        return model

    def double(x):
        return 2 * x

    compiled = lazy_compile(real)(double, dynamic=False)
    assert calls == []
    assert compiled(torch.ones(2)).tolist() == [2.0, 2.0] and compiled(torch.ones(1)).tolist() == [
        2.0
    ]
    assert calls == [(double, {"dynamic": False})]  # once, at the first call
    assert lazy_compile(real)(mode="max-autotune")(double)(torch.ones(1)).tolist() == [2.0]
    linear = torch.nn.Linear(2, 2)
    assert lazy_compile(real)(linear) is linear and calls[-1] == (linear, {})
