"""torch.distributed and Megatron's process groups for one rank, from the rank environment."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
from megatron.core import parallel_state, tensor_parallel

from cluster.env import rank_var
from moe_parallel.config import RunConfig, check_world_size


@dataclass(frozen=True)
class RankInfo:
    rank: int
    world_size: int
    local_rank: int
    device: str  # "cpu" or "cuda"

    @property
    def is_logger(self) -> bool:
        return self.rank == 0


def init_distributed(cfg: RunConfig, device: str, timeout_s: int = 600) -> RankInfo:
    """Join the job's process group (env://) and create Megatron's TP/PP/EP/DP groups."""
    from cluster.procs import forks_die_with_their_parent

    forks_die_with_their_parent()  # a killed rank leaves no forked checkpoint writer behind
    rank = rank_var("RANK")
    world = rank_var("WORLD_SIZE")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    check_world_size(cfg, world)
    if device == "cuda":
        torch.cuda.set_device(gpu_of_local_rank(local_rank, torch.cuda.device_count()))
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(
            backend=process_group_backend(device),
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    p = cfg.parallel
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=p.tensor,
        pipeline_model_parallel_size=p.pipeline,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline,
        context_parallel_size=p.context,
        expert_model_parallel_size=p.expert,
        expert_tensor_parallel_size=p.expert_tensor_size,
    )
    # Megatron's RNG tracker (dropout inside TP regions, expert-parallel streams).
    tensor_parallel.model_parallel_cuda_manual_seed(cfg.train.seed)
    return RankInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)


def process_group_backend(device: str) -> str:
    """NCCL between GPU ranks, gloo between CPU ranks."""
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device={device!r}: allowed values are 'cpu' or 'cuda'")
    return "nccl" if device == "cuda" else "gloo"


def gpu_of_local_rank(local_rank: int, visible_gpus: int) -> int:
    """The GPU index a rank drives. All of the node's GPUs visible (local, SLURM): one per local
    rank. One visible (Ray gives each rank actor its own GPU): that one."""
    if visible_gpus < 1:
        raise RuntimeError(
            f"local rank {local_rank} is a GPU rank but sees no GPU "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})"
        )
    return local_rank % visible_gpus


def shutdown_distributed() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
