"""PEER layer throughput (model/layers/peer.py): tokens/s of forward + backward of one PEER
layer against a dense GELU FFN with the same active parameters per token, on one process.

    python benchmarks/peer_layer.py [--d 256] [--experts 65536] [--heads 8] [--top-k 16]
                                    [--key-dim 128] [--tokens 4096] [--iters 5] [--device cpu]

The dense FFN's width f is chosen so that 2 d f equals PEER's active parameters (query net,
BatchNorm, product keys and h k rows of each expert table). Each figure is the median over
``--iters`` timed iterations after one warm-up. The retrieval's share of the PEER time is timed
on its own (query, BatchNorm, product-key top-k, softmax: forward + backward). The headline
last: ``peer_vs_dense_ffn_tokens_per_s=<ratio>``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402

from moe_parallel.model.layers.peer import PeerLayer, PeerSettings  # noqa: E402


def timed(fn, iters: int, device: str) -> float:
    fn()  # warm-up
    times = []
    for _ in range(iters):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--experts", type=int, default=256**2)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=16)
    ap.add_argument("--key-dim", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    args = ap.parse_args()
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    torch.manual_seed(0)
    config = TransformerConfig(
        num_layers=1,
        hidden_size=args.d,
        num_attention_heads=1,
        params_dtype=dtype,
        use_cpu_initialization=True,
    )
    settings = PeerSettings(
        num_experts=args.experts, heads=args.heads, top_k=args.top_k, key_dim=args.key_dim
    )
    peer = PeerLayer(config, settings).to(args.device)
    n = int(args.experts**0.5)
    active = (
        args.heads * args.key_dim * args.d
        + 2 * args.heads * args.key_dim
        + n * args.key_dim
        + 2 * args.heads * args.top_k * args.d
    )
    width = round(active / (2 * args.d))
    fc1 = torch.nn.Linear(args.d, width, bias=False, dtype=dtype, device=args.device)
    fc2 = torch.nn.Linear(width, args.d, bias=False, dtype=dtype, device=args.device)
    x = torch.randn(args.tokens, 1, args.d, dtype=dtype, device=args.device, requires_grad=True)
    probe = torch.randn_like(x)

    def peer_step():
        out, _ = peer(x)
        (out * probe).sum().backward()

    def retrieval_step():
        gates, _ = peer.retrieve(x.view(args.tokens, args.d))
        gates.sum().backward()

    def dense_step():
        (fc2(F.gelu(fc1(x))) * probe).sum().backward()

    t_peer = timed(peer_step, args.iters, args.device)
    t_retrieval = timed(retrieval_step, args.iters, args.device)
    t_dense = timed(dense_step, args.iters, args.device)
    tps_peer, tps_dense = args.tokens / t_peer, args.tokens / t_dense
    print(
        f"device {args.device}, {args.dtype}, {torch.get_num_threads()} threads, "
        f"{args.tokens} tokens, d={args.d}"
    )
    print(
        f"PEER: N={args.experts} ({n}^2), h={args.heads}, k={args.top_k}, key_dim="
        f"{args.key_dim}; total {sum(p.numel() for p in peer.parameters()):,} parameters, "
        f"active {active:,} per token"
    )
    print(f"dense GELU FFN: width {width}, {2 * args.d * width:,} parameters")
    print(f"{'layer':<22} {'fwd+bwd ms':>11} {'tokens/s':>10}")
    print(f"{'PEER':<22} {t_peer * 1e3:11.1f} {tps_peer:10.0f}")
    print(f"{'  of which retrieval':<22} {t_retrieval * 1e3:11.1f}")
    print(f"{'dense FFN':<22} {t_dense * 1e3:11.1f} {tps_dense:10.0f}")
    print(f"peer_tokens_per_s={tps_peer:.0f}")
    print(f"dense_ffn_tokens_per_s={tps_dense:.0f}")
    print(f"peer_vs_dense_ffn_tokens_per_s={tps_peer / tps_dense:.3f}")


if __name__ == "__main__":
    main()
