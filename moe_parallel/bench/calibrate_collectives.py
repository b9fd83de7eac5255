"""Rank side of ``moectl plan calibrate``: time the collectives over message sizes.

Run as ``python -m moe_parallel.bench.calibrate_collectives OUT.json`` on every rank of a local
run; the ranks join a gloo (CPU) or NCCL (GPU) group and time each collective of the planner's
model (all_gather, reduce_scatter, all_reduce, all_to_all, and a send / receive pair) at each size
in SIZES (bytes: the gathered buffer, what one rank sends, or the message), median of REPEATS
after a warm-up; the first rank writes {collective: [[bytes, seconds], ...]} to OUT.json.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

SIZES = [2**k for k in range(12, 25, 2)]  # 4 KiB .. 16 MiB
REPEATS = 7


def timed(fn, device: str) -> float:
    times = []
    for i in range(REPEATS + 1):
        dist.barrier()
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def collectives(size: int, world: int, rank: int, device: str) -> dict:
    n = max(size // 4 // world * world, world)  # fp32 elements, divisible by the group
    full = torch.ones(n, device=device)
    part = torch.ones(n // world, device=device)
    peer = rank ^ 1

    def p2p() -> None:
        if peer >= world:
            return
        if rank % 2 == 0:
            dist.send(full, peer)
            dist.recv(full, peer)
        else:
            dist.recv(full, peer)
            dist.send(full, peer)

    ops = {
        "all_gather": lambda: dist.all_gather_into_tensor(full, part),
        "reduce_scatter": lambda: dist.reduce_scatter_tensor(part, full),
        "all_reduce": lambda: dist.all_reduce(full),
        "all_to_all": lambda: dist.all_to_all_single(full.clone(), full),
        # a round trip: two messages, halved below
        "p2p": p2p,
    }
    out = {name: timed(fn, device) for name, fn in ops.items()}
    out["p2p"] /= 2
    return {name: [n * 4, t] for name, t in out.items()}


def main(out_path: str) -> None:
    from moe_parallel.runtime.bootstrap import prepare_process

    device = "cuda" if torch.cuda.is_available() else "cpu"
    prepare_process(device)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=rank, world_size=world)
    results: dict[str, list] = {}
    for size in SIZES:
        for name, point in collectives(size, world, rank, device).items():
            results.setdefault(name, []).append(point)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump({"world": world, "device": device, "points": results}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
