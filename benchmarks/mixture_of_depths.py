"""Mixture-of-Depths vs the same model dense: training step time at equal parameters.

One rank (CPU here, or the GPU when there is one), the MoD twin's structure at a larger size,
without experts: the dense model and the MoD model (every other block routed at 12.5%) have the
same blocks; MoD adds a router and a predictor per routed block (0.1% of the parameters). Each
step is forward + backward of the whole GPT model with its loss, on the same random tokens;
the figure is the median over the steps after the first two (warm-up). The planner's training
FLOPs per token (moe_parallel/plan/params.py) are printed beside the times.

    python benchmarks/mixture_of_depths.py [--hidden 256] [--layers 8] [--seq 1024] [--steps 8]

The headline last: ``mod_vs_dense_step_time=<MoD step time / dense step time>``.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
TWIN = REPO / "configs" / "tiny" / "mod_moe_tiny.yaml"
VOCAB = 1024


def _setup(gpu: bool) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(
        RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    import torch

    from moe_parallel.runtime.bootstrap import prepare_process

    # The figures are for every core of the machine: keep torch's default thread count.
    os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
    prepare_process("cuda" if gpu else "cpu")


def _overrides(args, gpu: bool) -> list[str]:
    heads = max(1, args.hidden // 64)
    return [
        "parallel.expert=1",
        "parallel.data=1",
        "model.moe=null",
        f"model.num_layers={args.layers}",
        f"model.hidden_size={args.hidden}",
        f"model.ffn_hidden_size={args.hidden * 4}",
        f"model.num_attention_heads={heads}",
        f"model.num_query_groups={heads}",
        f"model.seq_length={args.seq}",
        f"model.mod.predictor_hidden_size={max(16, args.hidden // 8)}",
        f"train.micro_batch_size={args.batch}",
        f"train.global_batch_size={args.batch}",
        f"train.device={'cuda' if gpu else 'cpu'}",
        f"train.precision={'bf16' if gpu else 'fp32'}",
    ]


def _time_steps(cfg, args, gpu: bool) -> tuple[float, int, int]:
    import torch

    from moe_parallel.config.megatron import transformer_config
    from moe_parallel.model.builder import build_model_chunks
    from moe_parallel.plan.params import count_parameters, describe

    model = build_model_chunks(cfg, transformer_config(cfg, on_cpu=not gpu), VOCAB, False)[0]
    model.train()
    dev = "cuda" if gpu else "cpu"
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (args.batch, args.seq), generator=g).to(dev)
    pos = torch.arange(args.seq, device=dev).expand(args.batch, -1)
    times = []
    for _ in range(args.steps):
        if gpu:
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = model(tokens, pos, None, labels=tokens).float().mean()
        loss.backward()
        if gpu:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    params = count_parameters(cfg.model, VOCAB).total
    flops = describe(
        cfg.model_copy(update={"model": cfg.model.model_copy(update={"vocab_size": VOCAB})})
    )["train_flops_per_token"]
    del model
    return statistics.median(times[2:]) * 1000, params, flops


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--capacity", type=float, default=0.125)
    args = parser.parse_args()
    import torch

    gpu = torch.cuda.is_available()
    _setup(gpu)
    from moe_parallel.runtime.bootstrap import start_rank, stop_rank
    from moe_parallel.train.one_rank import one_rank_config

    base = _overrides(args, gpu)
    mod_cfg = one_rank_config(TWIN, [*base, f"model.mod.capacity={args.capacity}"])
    dense_cfg = one_rank_config(TWIN, [*base, "model.mod=null"])
    start_rank(dense_cfg, "cuda" if gpu else "cpu")
    try:
        where = torch.cuda.get_device_name() if gpu else f"CPU ({torch.get_num_threads()} threads)"
        print(
            f"{where}: {args.layers} layers x {args.hidden}, seq {args.seq}, batch {args.batch}, "
            f"MoD capacity {args.capacity} on layers {mod_cfg.model.mod.routed_layers(args.layers)}"
        )
        print(f"{'model':<6} {'params':>11} {'GFLOP/token':>12} {'step ms':>9}")
        results = {}
        for name, cfg in (("dense", dense_cfg), ("MoD", mod_cfg)):
            ms, params, flops = _time_steps(cfg, args, gpu)
            results[name] = (ms, params, flops)
            print(f"{name:<6} {params:>11,} {flops / 1e9:>12.4f} {ms:>9.1f}", flush=True)
    finally:
        stop_rank()
    (d_ms, d_params, d_flops), (m_ms, m_params, m_flops) = results["dense"], results["MoD"]
    print(f"parameters: MoD / dense = {m_params / d_params:.4f}")
    print(f"planner FLOPs per token: MoD / dense = {m_flops / d_flops:.3f}")
    print(f"mod_vs_dense_step_time={m_ms / d_ms:.3f}")


if __name__ == "__main__":
    main()
