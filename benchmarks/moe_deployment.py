"""Expert buffering and expert load balancing (arXiv 2303.06182) on one process.

    python benchmarks/moe_deployment.py [--hidden 256] [--ffn 1024] [--experts 16] [--top-k 2]
        [--tokens 8] [--batches 20] [--rounds 5] [--budgets 1,2,4,8,12,16] [--ranks 4] [--trace PATH]
        [--png runs/benchmarks/moe_deployment_buffering.png] [--device cpu]

1. Buffering: one Megatron MoE layer (SequentialMLP experts) runs ``--batches`` decode-like
   batches of ``--tokens`` tokens (inputs shifted towards a few experts' router rows, so the
   routing is skewed as in served traffic) plainly and through the expert buffer at each budget:
   tokens/s (median over interleaved rounds; on CPU per CPU-second of one thread), hit rate, MB moved host -> slots per batch, slot memory as a
   share of all experts' memory. The curve is written to ``--png``. On CPU the "device" is a
   second tensor pool, so a miss is a RAM-to-RAM copy: the curve shows the copy cost, not PCIe.
2. Placement: per-expert loads per batch from a routing trace (``--trace``: a
   moe_parallel.monitor.routing_trace file; else a constructed Zipf trace with correlated expert pairs),
   max/mean rank load over ``--ranks`` EP ranks for the contiguous default, greedy and
   anti-correlation placements; the paper's figures printed next to ours.

3. Gating: dynamic (dropless) vs static gating (``--capacity-factor``, padded to capacity,
   overflow dropped) on the same weights and batches: tokens/s, expert input rows per batch,
   dropped token-expert pairs.
4. With ``--checkpoint RUN_OR_CKPT`` (a trained run of ours, e.g. the tiny one): the same
   comparison on the whole trained model, forwards of ``--seq`` tokens of text: tokens/s,
   expert input rows and the experts' activation memory per forward (peak: measured on a GPU,
   computed from the rows on CPU), dropped pairs.

Headline last: ``balanced_batch_max_over_mean=<anti-correlation, per batch>``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from moe_parallel.runtime.bootstrap import prepare_process  # noqa: E402
from moe_parallel.serve.placement import (
    anti_correlation_placement,
    batch_loads,  # noqa: E402
    contiguous_placement,
    greedy_placement,
    imbalance,
)

PCIE_BYTES_PER_S = 12e9  # the paper's measured CPU-GPU copy rate (PCIe 3.0 x16 saturated)
PAPER = {
    "buffering": "cache of 1-16 experts/GPU saves 0-32.2% of static memory; static allocation "
    "down up to 1.47x; throughput ~ baseline single-node; CPU-GPU link saturates "
    "at ~12 GB/s (PCIe 3.0)",
    "balancing": "max per-device load share on the LM from >0.6 to <0.4; throughput +10.1% (LM), "
    "+19.5% (MT enc), +1.9% (MT dec with buffering)",
}


def skewed_inputs(layer, args, g):
    rows = layer.router.weight.detach()
    pull = rows[:3].sum(0) / rows[:3].norm() * 1.5  # towards experts 0-2
    return [
        (torch.randn(args.tokens, 1, args.hidden, generator=g) + pull).to(args.device)
        for _ in range(args.batches)
    ]


def run_pass(layer, batches, device) -> float:
    """Seconds for the batches: wall time on GPU; on CPU this process's CPU time (one torch
    thread), since a shared machine's wall time swings 50x with other jobs' load."""
    clock = time.perf_counter if device == "cuda" else time.process_time
    start = clock()
    with torch.no_grad():
        for x in batches:
            layer(x)
    if device == "cuda":
        torch.cuda.synchronize()
    return clock() - start


def buffering(args) -> list[dict]:
    """Plain and buffered layers timed in interleaved rounds (one pass each per round, medians):
    the machine's background load shifts all of them alike."""
    from moe_parallel.serve.buffering import buffer_moe_layer
    from moe_parallel.serve.standalone import build_moe_layer

    def fresh():
        return build_moe_layer(args.hidden, args.ffn, args.experts, args.top_k, seed=0)

    plain = fresh().to(args.device)
    batches = skewed_inputs(plain, args, torch.Generator().manual_seed(0))
    layers, buffers = {"plain": plain}, {}
    for budget in args.budgets:
        twin = fresh()
        buffers[budget] = buffer_moe_layer(twin, budget, args.device).buffer
        layers[budget] = twin.to(args.device)
    for layer in layers.values():
        run_pass(layer, batches[:2], args.device)  # warm-up
    start = {b: buf.stats.as_dict() for b, buf in buffers.items()}
    times = {name: [] for name in layers}
    for _ in range(args.rounds):
        for name, layer in layers.items():
            times[name].append(run_pass(layer, batches, args.device))
    tokens = args.tokens * args.batches
    rows = [{"budget": "plain", "tokens_per_s": tokens / statistics.median(times["plain"])}]
    print(f"plain layer: {rows[0]['tokens_per_s']:,.0f} tokens/s")
    for budget, buf in buffers.items():
        after, before = buf.stats.as_dict(), start[budget]
        hits, misses = after["hits"] - before["hits"], after["misses"] - before["misses"]
        passes = args.rounds * args.batches
        row = {
            "budget": budget,
            "tokens_per_s": tokens / statistics.median(times[budget]),
            "hit_rate": hits / (hits + misses),
            "mb_per_batch": (after["bytes_moved"] - before["bytes_moved"]) / 1e6 / passes,
            "slot_share": budget / args.experts,
            "pcie_ms_per_batch": (after["bytes_moved"] - before["bytes_moved"])
            / passes
            / PCIE_BYTES_PER_S
            * 1e3,
        }
        rows.append(row)
        print(
            f"budget {budget:3d} slots ({row['slot_share']:.0%} of expert memory): "
            f"{row['tokens_per_s']:,.0f} tokens/s "
            f"({row['tokens_per_s'] / rows[0]['tokens_per_s']:.2f} x plain), "
            f"hit rate {row['hit_rate']:.2f}, {row['mb_per_batch']:.2f} MB moved/batch "
            f"(= {row['pcie_ms_per_batch']:.2f} ms at the paper's 12 GB/s)"
        )
    return rows


def plot(rows, path: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    buffered = [r for r in rows if r["budget"] != "plain"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(
        [r["budget"] for r in buffered],
        [r["tokens_per_s"] for r in buffered],
        "o-",
        label="expert buffering",
    )
    ax.axhline(rows[0]["tokens_per_s"], color="gray", ls="--", label="all experts resident")
    ax.set_xlabel(f"buffer budget (expert slots of {args.experts})")
    ax.set_ylabel("tokens/s" if args.device == "cuda" else "tokens per CPU-second")
    ax.set_ylim(bottom=0)
    ax.set_title(f"MoE layer, {args.tokens} tokens/batch, top-{args.top_k}, {args.device}")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    print(f"curve: {path}")


def constructed_trace(experts: int, batches=200, tokens=64, top_k=2, seed=0):
    rng = np.random.default_rng(seed)
    popularity = 1.0 / np.arange(1, experts + 1) ** 1.2
    out = []
    for _ in range(batches):
        p = popularity * rng.uniform(0.3, 1.7, experts)
        for j in range(experts // 4):
            burst = rng.uniform(0.2, 3.0)
            p[2 * j] *= burst
            p[2 * j + 1] *= burst
        p /= p.sum()
        out.append(
            np.array([rng.choice(experts, top_k, replace=False, p=p) for _ in range(tokens)])
        )
    return out


def placement(args) -> dict:
    if args.trace:
        from moe_parallel.monitor.routing_trace import load_trace

        trace = load_trace(args.trace)
        layer = sorted(trace.layers)[0]
        cut, experts, source = list(trace.forwards(layer)), trace.num_experts, args.trace
    else:
        experts = 64
        cut, source = constructed_trace(experts), "constructed Zipf trace, 64 experts"
    loads = batch_loads(cut, experts)
    found = {
        "contiguous": imbalance(loads, contiguous_placement(experts), args.ranks),
        "greedy": imbalance(loads, greedy_placement(loads.mean(0), args.ranks), args.ranks),
        "anti_correlation": imbalance(
            loads, anti_correlation_placement(loads, args.ranks), args.ranks
        ),
    }
    print(f"placement on {args.ranks} EP ranks, {source}, {len(cut)} batches:")
    for name, f in found.items():
        print(
            f"  {name:17s} max/mean total {f['total_max_over_mean']:.3f}, per batch "
            f"{f['batch_max_over_mean']:.3f}, max rank share {f['max_rank_share']:.3f}"
        )
    return found


def gating(args) -> dict:
    """Dynamic (dropless, exact counts) vs static gating (capacity C*T*k/E per expert, padded,
    overflow dropped) on the same layer weights and skewed batches: tokens/s, the expert input
    rows each batch allocates (the activation memory the padding costs) and the tokens dropped."""
    from moe_parallel.serve.options import expert_capacity
    from moe_parallel.serve.standalone import build_moe_layer

    layers = {
        "dynamic": build_moe_layer(args.hidden, args.ffn, args.experts, args.top_k, seed=0),
        "static": build_moe_layer(
            args.hidden,
            args.ffn,
            args.experts,
            args.top_k,
            seed=0,
            capacity_factor=args.capacity_factor,
        ),
    }
    layers = {k: v.to(args.device) for k, v in layers.items()}
    batches = skewed_inputs(layers["dynamic"], args, torch.Generator().manual_seed(1))
    times = {name: [] for name in layers}
    for layer in layers.values():
        run_pass(layer, batches[:2], args.device)  # warm-up
    for _ in range(args.rounds):
        for name, layer in layers.items():
            times[name].append(run_pass(layer, batches, args.device))
    capacity = expert_capacity(args.tokens, args.top_k, args.experts, args.capacity_factor)
    dropped = 0
    with torch.no_grad():
        for x in batches:
            _, routing_map = layers["dynamic"].router(x)
            dropped += int((routing_map.sum(0) - capacity).clamp(min=0).sum())
    tokens = args.tokens * args.batches
    out = {name: tokens / statistics.median(t) for name, t in times.items()}
    rows = {"dynamic": args.tokens * args.top_k, "static": args.experts * capacity}
    print(
        f"gating ({args.tokens} tokens x top-{args.top_k} over {args.experts} experts, "
        f"capacity factor {args.capacity_factor} -> {capacity} slots per expert):"
    )
    print(
        f"  dynamic: {out['dynamic']:,.0f} tokens/s, {rows['dynamic']} expert input rows per "
        f"batch, nothing dropped"
    )
    print(
        f"  static:  {out['static']:,.0f} tokens/s, {rows['static']} expert input rows per batch "
        f"(x{rows['static'] / rows['dynamic']:.2f} padding), {dropped} of {tokens * args.top_k} "
        f"token-expert pairs dropped"
    )
    print(
        "  paper: dynamic gating up to 6.21x (LM) / 5.75x (MT enc) static's throughput on one "
        "node; static's waste factor E*C*S/2S is 12.8 (LM) and 64 (MT)"
    )
    out["static_rows_over_dynamic"] = rows["static"] / rows["dynamic"]
    return out


def gating_on_checkpoint(args) -> dict:
    """Dynamic vs static gating on a trained checkpoint: both models built from the same
    weights, forwards of ``--seq``-token pieces of this file's text, interleaved rounds."""
    import tempfile

    from moe_parallel.data.packing import tokenizer_only
    from moe_parallel.data.tokenizer import Tokenizer
    from moe_parallel.monitor.routing_recorder import RoutingRecorder
    from moe_parallel.serve.generate import forward_logits
    from moe_parallel.serve.model import find_checkpoint, load_serving_model, serving_config
    from moe_parallel.serve.options import ServeOptions, expert_capacity

    ckpt = find_checkpoint(args.checkpoint)
    job = Path(tempfile.mkdtemp(prefix="moe-deploy-bench-"))
    options = {
        "dynamic": ServeOptions(),
        "static": ServeOptions(gating="static", capacity_factor=args.capacity_factor),
    }
    cfgs = {
        name: serving_config(ckpt, job, 1, o, on_cpu=args.device == "cpu")
        for name, o in options.items()
    }
    tokenizer = Tokenizer.from_file(tokenizer_only(cfgs["dynamic"]).tokenizer_path)
    vocab = cfgs["dynamic"].model.vocab_size or tokenizer.vocab_size
    ids = tokenizer.encode(Path(__file__).read_text())
    pieces = [
        torch.tensor([ids[i : i + args.seq]]) for i in range(0, len(ids) - args.seq, args.seq)
    ]
    pieces = pieces[: args.batches]
    models = {
        name: load_serving_model(cfg, ckpt, vocab, on_cpu=args.device == "cpu")
        for name, cfg in cfgs.items()
    }
    m = cfgs["dynamic"].model
    gated = m.activation in ("swiglu", "geglu")
    ffn = m.moe.expert_ffn_hidden_size
    bytes_per_row = 4 * (2 * m.hidden_size + (3 if gated else 2) * ffn)  # in, fc1, act, out
    clock = time.perf_counter if args.device == "cuda" else time.process_time
    times = {name: [] for name in models}
    peaks = {}
    for _ in range(args.rounds):
        for name, model in models.items():
            if args.device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            start = clock()
            for x in pieces:
                forward_logits(model, x.to(args.device), vocab)
            if args.device == "cuda":
                torch.cuda.synchronize()
                peaks[name] = torch.cuda.max_memory_allocated() - base
            times[name].append(clock() - start)
    out = {}
    for name, model in models.items():
        with RoutingRecorder(model) as rec:
            forward_logits(model, pieces[0].to(args.device), vocab)
        routed = {layer: int(a.size) for layer, a in rec.experts().items()}
        moe = cfgs[name].model.moe
        if name == "static":
            cap = expert_capacity(args.seq, moe.top_k, moe.num_experts, args.capacity_factor)
            rows = moe.num_experts * cap
        else:
            rows = args.seq * moe.top_k
        out[name] = {
            "tokens_per_s": args.seq * len(pieces) / statistics.median(times[name]),
            "rows_per_layer": rows,
            "dropped": sum(rec.dropped_per_layer().values()),
            "routed": sum(routed.values()),
            "expert_activation_mb": rows * bytes_per_row / 1e6,
            "measured_peak_mb": peaks.get(name, 0) / 1e6 if peaks else None,
        }
    print(
        f"gating on the trained model {ckpt} ({len(pieces)} forwards of {args.seq} tokens, "
        f"capacity factor {args.capacity_factor}):"
    )
    for name, row in out.items():
        peak = (
            f", measured peak {row['measured_peak_mb']:.1f} MB"
            if row["measured_peak_mb"] is not None
            else ""
        )
        print(
            f"  {name:7s} {row['tokens_per_s']:,.0f} tokens/s, {row['rows_per_layer']} expert "
            f"input rows per layer per forward, expert activations {row['expert_activation_mb']:.2f}"
            f" MB per layer (computed){peak}, dropped {row['dropped']} of {row['routed']} pairs "
            "in the first forward"
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--ffn", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--budgets", default="1,2,4,8,12,16")
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--trace", default=None)
    parser.add_argument(
        "--checkpoint",
        default=None,
        help="also compare gating on this trained run or checkpoint of ours (whole model)",
    )
    parser.add_argument("--seq", type=int, default=64, help="tokens per forward (--checkpoint)")
    parser.add_argument(
        "--capacity-factor",
        type=float,
        default=2.0,
        help="static gating's capacity factor (the gating comparison)",
    )
    parser.add_argument(
        "--png", default=str(REPO / "runs" / "benchmarks" / "moe_deployment_buffering.png")
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    args.budgets = [int(b) for b in args.budgets.split(",")]
    prepare_process(args.device)  # one intra-op thread on CPU (OMP_NUM_THREADS unset)
    from moe_parallel.serve.standalone import start_one_rank

    start_one_rank()
    rows = buffering(args)
    plot(rows, Path(args.png), args)
    print(f"paper (buffering): {PAPER['buffering']}")
    speeds = gating(args)
    print(f"dynamic_vs_static_tokens_per_s={speeds['dynamic'] / speeds['static']:.3f}")
    if args.checkpoint:
        trained = gating_on_checkpoint(args)
        print(
            "trained_dynamic_vs_static_tokens_per_s="
            f"{trained['dynamic']['tokens_per_s'] / trained['static']['tokens_per_s']:.3f}"
        )
    found = placement(args)
    print(f"paper (balancing): {PAPER['balancing']}")
    print(f"contiguous_batch_max_over_mean={found['contiguous']['batch_max_over_mean']:.3f}")
    print(f"balanced_batch_max_over_mean={found['anti_correlation']['batch_max_over_mean']:.3f}")


if __name__ == "__main__":
    main()
