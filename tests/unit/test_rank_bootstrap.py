"""Every program that runs as a rank starts through runtime.bootstrap before Megatron is imported.

The warning filters and, on CPU ranks, MOE_PARALLEL_DEVICE=cpu must precede Megatron-core's
import: the import hook leaves Megatron's fusions uncompiled on CPU only when it sees the variable
(runtime/megatron_import.py). A rank program that imports Megatron at module level would compile
them and print Megatron's warnings on every start.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

RANK_PROGRAMS = [
    "moe_parallel.train.entry",
    "moe_parallel.train.eval_entry",
    "moe_parallel.convert.entry",
    "moe_parallel.serve.entry",
    "moe_parallel.btx.mix_entry",
    "moe_parallel.upcycle.entry",
    "moe_parallel.bench.step_overhead",
    "moe_parallel.bench.monitor_overhead",
    "moe_parallel.bench.checkpoint_save",
    "moe_parallel.bench.doctor_rank",
]

PROBE = """
import importlib, json, sys
importlib.import_module(sys.argv[1])
print(json.dumps("megatron.core" in sys.modules))
"""


@pytest.mark.parametrize("module", RANK_PROGRAMS)
def test_importing_a_rank_program_leaves_megatron_to_the_bootstrap(module):
    done = subprocess.run(
        [sys.executable, "-c", PROBE, module], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) is False, f"{module} imports Megatron"


PREPARED = """
import json, os, sys, warnings
from moe_parallel.runtime.bootstrap import prepare_process
prepare_process("cpu")
import torch
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("default")
    import megatron.core.optimizer  # warns that TE and Apex are missing, filtered here
from moe_parallel.runtime import cpu_adapter
print(json.dumps({"device": os.environ["MOE_PARALLEL_DEVICE"], "adapter": cpu_adapter.is_active(),
                  "threads": torch.get_num_threads()}))
"""


def test_prepare_process_sets_the_device_the_adapter_and_one_thread():
    env = {k: v for k, v in __import__("os").environ.items() if k != "OMP_NUM_THREADS"}
    done = subprocess.run(
        [sys.executable, "-c", PREPARED],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == {
        "device": "cpu",
        "adapter": True,
        "threads": 1,
    }
    assert "Transformer Engine and Apex are not installed" not in done.stderr


def test_an_unknown_device_is_refused_by_name():
    from moe_parallel.runtime.bootstrap import prepare_process

    with pytest.raises(ValueError, match=r"device='tpu': allowed values are 'cpu' or 'cuda'"):
        prepare_process("tpu")
