"""The planner's memory model against what real CPU ranks allocate (gloo, Megatron-core 0.16.1).

For the tiny twins (moe_tiny, deepseek_moe_tiny, ...) under 1 rank, EP2, TP2+SP and PP2, in fp32 and
bf16, with and without the distributed optimizer, and with frozen parameters (PESC's adapters-only
training, a frozen router), every rank builds the model, DDP and optimizer
as training does and runs one step on synthetic tokens (tests/parallel/plan_memory_probe.py):

- weights, gradients and optimizer-state bytes of each rank must EQUAL the planner's numbers
  (DDP parameter and fp32 gradient buffers with their padding; fp32 main copies, exp_avg and
  exp_avg_sq of the rank's distributed-optimizer shard);
- the activation estimate (unfused attention, as on CPU) must be within 15% of the peak of the
  bytes autograd holds for backward over the step's 1F1B schedule, measured with saved-tensor
  hooks (each storage counted once while saved, parameter and gradient storages excluded).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.parallel

MOE = str(REPO / "configs" / "tiny" / "moe_tiny.yaml")
DEEPSEEK = str(REPO / "configs" / "tiny" / "deepseek_moe_tiny.yaml")
GRIN = str(REPO / "configs" / "tiny" / "grin_moe_tiny.yaml")
YUAN = str(REPO / "configs" / "tiny" / "yuan2_m32_tiny.yaml")
CAMELIDAE = str(REPO / "configs" / "tiny" / "camelidae_tiny.yaml")
QWEN3 = str(REPO / "configs" / "tiny" / "qwen3_moe_tiny.yaml")
V3 = str(REPO / "configs" / "tiny" / "deepseek_v3_tiny.yaml")  # MLA, MTP, expert bias
V2_LITE = str(REPO / "configs" / "tiny" / "deepseek_v2_lite_tiny.yaml")  # MLA, no query latent
OLMOE = str(REPO / "configs" / "tiny" / "olmoe_tiny.yaml")  # QK-norm over whole projections
# A fixed vocabulary (no tokenizer needed: synthetic tokens) and 2 micro-batches of 2 per rank.
BASE = ["model.vocab_size=512", "train.global_batch_size=4", "train.micro_batch_size=2"]
ONE = ["parallel.expert=1", "parallel.data=1"]
CASES_ONE_RANK = {
    "moe-1rank": (MOE, ONE),
    "deepseek-1rank-bf16-plain-optimizer": (
        DEEPSEEK,
        [*ONE, "train.precision=bf16", "parallel.distributed_optimizer=false"],
    ),
    "grin-1rank": (GRIN, ONE),
    "moe-1rank-recompute-full": (MOE, [*ONE, "train.recompute=full"]),
    "deepseek-1rank-recompute-selective": (DEEPSEEK, [*ONE, "train.recompute=selective"]),
    # Frozen parameters: no gradient buffer, no optimizer state (PESC; Flan-MoE's frozen router).
    "camelidae-1rank-adapters-only": (CAMELIDAE, [*ONE, "train.trainable=adapters_and_routers"]),
    "qwen3-1rank": (QWEN3, ONE),
    "v3-1rank": (V3, ONE),
    "v2-lite-1rank": (V2_LITE, ONE),
}
CASES_TWO_RANKS = {
    "moe-EP2": (MOE, ["parallel.expert=2", "parallel.data=2", "train.global_batch_size=8"]),
    "moe-TP2+SP": (MOE, ["parallel.tensor=2", "parallel.sequence_parallel=true", *ONE]),
    "deepseek-EP2-bf16": (
        DEEPSEEK,
        [
            "parallel.expert=2",
            "parallel.data=2",
            "train.global_batch_size=8",
            "train.precision=bf16",
        ],
    ),
    "deepseek-PP2": (DEEPSEEK, ["parallel.pipeline=2", *ONE]),
    "yuan-TP2+SP": (YUAN, ["parallel.tensor=2", "parallel.sequence_parallel=true", *ONE]),
    # The MTP module and its embedding copy on the last of two uneven stages (1 + 3 layers).
    "v3-PP2-uneven": (V3, ["parallel.pipeline=2", "parallel.first_stage_layers=1", *ONE]),
    "v3-TP2+SP": (V3, ["parallel.tensor=2", "parallel.sequence_parallel=true", *ONE]),
    "olmoe-TP2+SP": (OLMOE, ["parallel.tensor=2", "parallel.sequence_parallel=true", *ONE]),
    "moe-EP2-frozen-router": (
        MOE,
        [
            "parallel.expert=2",
            "parallel.data=2",
            "train.global_batch_size=8",
            "finetune.freeze=[router]",
            "finetune.attention=across_examples",
        ],
    ),
}


def _launch(world: int, cases: dict, out_dir) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spec = [{"name": n, "config": c, "overrides": [*BASE, *o]} for n, (c, o) in cases.items()]
    procs = []
    for rank in range(world):
        env = dict(
            os.environ,
            RANK=str(rank),
            WORLD_SIZE=str(world),
            LOCAL_RANK=str(rank),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            OMP_NUM_THREADS="1",
            PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        )
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    str(REPO / "tests" / "parallel" / "plan_memory_probe.py"),
                    str(out_dir),
                    json.dumps(spec),
                ],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    for rank, p in enumerate(procs):
        assert p.returncode == 0, f"rank {rank} failed:\n{outputs[rank][-4000:]}"


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("plan-memory")
    _launch(1, CASES_ONE_RANK, out)
    _launch(2, CASES_TWO_RANKS, out)
    found = {}
    for path in out.glob("*.json"):
        name, rank = path.name[: -len(".json")].rsplit(".rank", 1)
        found[(name, int(rank))] = json.loads(path.read_text())
    return found


ALL = {**CASES_ONE_RANK, **CASES_TWO_RANKS}
# Autograd saves less around frozen weights (a frozen linear keeps no input for a weight
# gradient, and nothing before the first trained parameter needs saving); the estimate does not
# model that, so for PESC's adapters-only training it is an upper bound (measured: 1.46x).
ACTIVATIONS_UPPER_BOUND = {"camelidae-1rank-adapters-only"}


@pytest.mark.parametrize("name", list(ALL))
def test_planner_matches_real_ranks(name, measured):
    from moe_parallel.config import load_config
    from moe_parallel.plan.memory import estimate_memory

    config, overrides = ALL[name]
    cfg = load_config(config, [*BASE, *overrides])
    estimate = estimate_memory(cfg, attention="unfused")
    ranks = [r for (n, _), r in measured.items() if n == name]
    assert len(ranks) == cfg.world_size, (name, sorted(measured))
    for got in ranks:
        stage = estimate.stages[got["pp_rank"]]
        where = (name, got["rank"])
        assert got["param_bytes"] == stage.weights, where
        assert got["grad_bytes"] == stage.grads, where
        assert got["optimizer_bytes"] == stage.optimizer_by_dp_rank[got["dp_rank"]], where
        ratio = stage.activations / got["saved_peak_bytes"]
        print(
            f"{name} rank {got['rank']}: activations estimated {stage.activations} B, "
            f"measured {got['saved_peak_bytes']} B (x{ratio:.3f})"
        )
        if name in ACTIVATIONS_UPPER_BOUND:
            assert ratio >= 1, (where, stage.activations, got["saved_peak_bytes"])
        else:
            assert abs(ratio - 1) < 0.15, (where, stage.activations, got["saved_peak_bytes"])
