"""A rank program (2 ranks, EP 2) for test_cpu_adapter_megatron: two Megatron-core paths that read
``torch.cuda.device_count()``, run under the CPU adapter as Megatron's own tests run them.

1. Megatron's own seeding, then a router with ``moe_router_force_load_balancing``: the seeding
   fills the model-parallel RNG tracker only when ``device_count() > 0``, and the forced balance
   draws its logits inside the tracker's expert-parallel fork.
2. An async save through Megatron's *persistent* checkpoint worker (a spawned process that sets
   ``rank % device_count()`` as its device), finalized, closed and loaded back.

Each rank writes what it saw to RUN_DIR/rank{R}.json.

    (launched by cluster.run_local) cpu_adapter_megatron_check.py RUN_DIR
"""

from __future__ import annotations

import json
import os
import random
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from moe_parallel.runtime.bootstrap import start_rank, stop_rank  # noqa: E402

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny" / "moe_tiny.yaml"
SEED = 123  # Megatron's MoE tests seed with _set_random_seed(seed_=123)
EXPERTS, TOP_K, HIDDEN = 4, 2, 12
WORKER_TIMEOUT_S = 120


def megatron_set_random_seed(seed_: int, data_parallel_random_init: bool = False) -> None:
    """Megatron-LM's ``_set_random_seed`` (megatron/training/initialize.py, the release that ships
    megatron-core 0.16), which Megatron's MoE unit tests call in their set-up. megatron/training
    is not part of the megatron-core package, so its body is repeated here as written there."""
    from megatron.core import parallel_state as mpu
    from megatron.core import tensor_parallel

    if seed_ is not None and seed_ > 0:
        seed = seed_ + (100 * mpu.get_pipeline_model_parallel_rank())
        if data_parallel_random_init:
            seed = seed + (10 * mpu.get_data_parallel_rank())
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        if torch.cuda.device_count() > 0:
            tensor_parallel.model_parallel_cuda_manual_seed(seed)
    else:
        raise ValueError("Seed ({}) should be a positive integer.".format(seed_))


def force_load_balancing() -> dict:
    """Megatron's test_routers.py::test_force_load_balancing set-up (local spec, SequentialMLP
    experts), here in fp32 on 2 EP ranks, compared with the draws the tracker's expert-parallel
    seed must give: ``seed + 1024 + 100 * ep_rank`` (tensor_parallel/random.py)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.tensor_parallel import get_cuda_rng_tracker
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.transformer_config import TransformerConfig

    tracker_before = sorted(get_cuda_rng_tracker().get_states())
    megatron_set_random_seed(SEED)
    config = TransformerConfig(
        num_layers=2,
        hidden_size=HIDDEN,
        num_attention_heads=4,
        num_moe_experts=EXPERTS,
        use_cpu_initialization=True,
        moe_router_load_balancing_type="aux_loss",
        moe_router_topk=TOP_K,
        moe_aux_loss_coeff=0.0,
        moe_token_dispatcher_type="alltoall",
        expert_model_parallel_size=2,
        add_bias_linear=False,
        moe_router_force_load_balancing=True,
    )
    spec = get_gpt_layer_local_spec(num_experts=EXPERTS, moe_grouped_gemm=False)
    router = MoELayer(config, spec.submodules.mlp.submodules).router
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    hidden = torch.randn(
        8, 2, HIDDEN, generator=torch.Generator().manual_seed(5), requires_grad=True
    )
    cpu_state = torch.get_rng_state()
    probs, routing_map = router(hidden)
    cpu_state_kept = torch.equal(cpu_state, torch.get_rng_state())
    weights = torch.arange(probs.numel(), dtype=probs.dtype).reshape(probs.shape) / probs.numel()
    (probs * weights).sum().backward()

    # The reference: the expert-parallel generator's normal draws replace the gate's logits
    # (a straight-through estimator: the backward goes to the gate as if they were the logits).
    gate = hidden.detach().reshape(-1, HIDDEN) @ router.weight.detach().t()
    gate.requires_grad_(True)
    draws = torch.randn(
        gate.shape, generator=torch.Generator().manual_seed(SEED + 1024 + 100 * ep_rank)
    )
    logits = gate + (draws - gate).detach()
    top, chosen = torch.topk(logits, TOP_K, dim=-1)
    want = torch.zeros_like(logits).scatter(1, chosen, torch.softmax(top, dim=-1))
    (want * weights).sum().backward()
    want_weight_grad = gate.grad.t() @ hidden.detach().reshape(-1, HIDDEN)
    return {
        "ep_rank": ep_rank,
        "tracker_before_seeding": tracker_before,
        "tracker_after_seeding": sorted(get_cuda_rng_tracker().get_states()),
        "routing_equal": torch.equal(routing_map, want > 0),
        "probs_max_diff": float((probs - want.detach()).abs().max()),
        "weight_grad_max_diff": float((router.weight.grad - want_weight_grad).abs().max()),
        "weight_grad_norm": float(router.weight.grad.norm()),
        "cpu_rng_kept": cpu_state_kept,
        "first_draws": [round(float(x), 6) for x in draws[0]],
    }


def persistent_async_save(ckpt_dir: Path) -> dict:
    """An async save through ``AsyncCallsQueue(persistent=True)``, as Megatron's
    test_async_save.py parametrizes it, then a load of what it wrote."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if rank == 0:
        ckpt_dir.mkdir()
    torch.distributed.barrier()

    def state(fill: bool) -> dict:
        local = torch.arange(8.0).reshape(2, 4) + 100 * rank if fill else torch.zeros(2, 4)
        shared = torch.full((3,), 7.5) if fill else torch.zeros(3)
        return {
            "rows": ShardedTensor.from_rank_offsets("rows", local, (0, rank, world)),
            "shared": ShardedTensor.from_rank_offsets("shared", shared, replica_id=rank),
        }

    request = dist_checkpointing.save(state(True), str(ckpt_dir), async_sharded_save=True)
    queue = AsyncCallsQueue(persistent=True)
    # Megatron waits on its worker without looking at it (the schedule joins the worker's staging
    # queue, the poll waits for its completion queue): a worker that died would hang the ranks.
    # The schedule runs in a thread; each round the ranks agree whether a worker died (or the
    # time is up) and whether every schedule returned, before polling together.
    scheduling = threading.Thread(target=queue.schedule_async_request, args=(request,))
    scheduling.daemon = True
    scheduling.start()
    deadline = time.monotonic() + WORKER_TIMEOUT_S
    while True:
        worker = _worker(queue)
        died = worker is not None and worker.exitcode is not None
        flags = torch.tensor([int(died or time.monotonic() > deadline), int(scheduling.is_alive())])
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        if int(flags[0]):
            if queue.persistent_caller is not None:
                queue.persistent_caller.close(abort=True)  # else its __del__ waits on the worker
            raise RuntimeError(
                f"rank {rank}: a persistent checkpoint worker died or the save passed "
                f"{WORKER_TIMEOUT_S} s (this rank's worker: exit code "
                f"{None if worker is None else worker.exitcode})"
            )
        if not int(flags[1]) and queue.maybe_finalize_async_calls(blocking=False):
            break
        time.sleep(0.05)
    queue.close()
    loaded = dist_checkpointing.load(state(False), str(ckpt_dir))
    return {
        "worker_pid_differs": worker.pid != os.getpid(),
        "worker_exitcode": worker.exitcode,
        "rows": loaded["rows"].tolist(),
        "shared": loaded["shared"].tolist(),
    }


def _worker(queue):
    caller = queue.persistent_caller
    return None if caller is None else caller.process


def main(run_dir: Path) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    from moe_parallel.config import load_config

    info = start_rank(load_config(str(TINY)), "cpu")  # EP 2 x DP 2 on 2 ranks
    # start_rank seeds the tracker itself (runtime/distributed.py); Megatron's tests start
    # without that, from Megatron's own seeding alone.
    get_cuda_rng_tracker().reset()
    record = {
        "device_count": torch.cuda.device_count(),
        "cuda_available": torch.cuda.is_available(),
        "force_load_balancing": force_load_balancing(),
        "async_save": persistent_async_save(run_dir / "ckpt"),
    }
    (run_dir / f"rank{info.rank}.json").write_text(json.dumps(record))
    torch.distributed.barrier()
    stop_rank()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
