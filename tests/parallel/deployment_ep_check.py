"""A rank program (EP = world size) for test_deployment_placement: one Megatron MoE layer whose
experts are sharded over the ranks, loaded from the same global weights under the contiguous
default and under a placement (experts moved between ranks, router rows permuted); each rank
writes its outputs' equality and the difference to a plain-torch reference to RUN_DIR.

    (launched by cluster.run_local) deployment_ep_check.py RUN_DIR
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from moe_parallel.runtime.bootstrap import machine_device, prepare_process  # noqa: E402

E, K, D, FFN = 8, 2, 16, 32
PLACEMENT = [7, 2, 5, 0, 1, 6, 3, 4]  # ranks of 2: {7,2,5,0} and {1,6,3,4}


def global_weights():
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(E, D, generator=g),
        torch.randn(E, 2 * FFN, D, generator=g) * 0.3,
        torch.randn(E, D, FFN, generator=g) * 0.3,
    )


def load(layer, perm, rank, ranks):
    router_ED, fc1, fc2 = global_weights()
    per_rank = E // ranks
    with torch.no_grad():
        layer.router.weight.copy_(router_ED[perm])
        for i, expert in enumerate(layer.experts.local_experts):
            e = perm[rank * per_rank + i]
            expert.linear_fc1.weight.copy_(fc1[e])
            expert.linear_fc2.weight.copy_(fc2[e])


def reference(x_TD):
    router_ED, fc1, fc2 = global_weights()
    top, chosen = torch.topk(x_TD @ router_ED.t(), K, dim=-1)
    gates = top.softmax(-1)
    out = torch.zeros_like(x_TD)
    for t in range(len(x_TD)):
        for j in range(K):
            gate, up = (fc1[chosen[t, j]] @ x_TD[t]).chunk(2)
            out[t] += gates[t, j] * (fc2[chosen[t, j]] @ (F.silu(gate) * up))
    return out


def main(run_dir: Path) -> None:
    from moe_parallel.serve.standalone import build_moe_layer, start_one_rank

    ranks = int(os.environ["WORLD_SIZE"])
    rank = int(os.environ["RANK"])
    start_one_rank(expert_parallel=ranks)
    x = torch.randn(6, 2, D, generator=torch.Generator().manual_seed(10 + rank))
    outs = {}
    for name, perm in (("contiguous", list(range(E))), ("placed", PLACEMENT)):
        layer = build_moe_layer(D, FFN, E, K)
        load(layer, perm, rank, ranks)
        with torch.no_grad():
            outs[name] = layer(x)[0]
    want = reference(x.reshape(-1, D)).reshape(x.shape)
    (run_dir / f"rank{rank}.json").write_text(
        json.dumps(
            {
                "local_experts": len(layer.experts.local_experts),
                "equal": torch.equal(outs["contiguous"], outs["placed"]),
                "max_diff": float((outs["contiguous"] - outs["placed"]).abs().max()),
                "vs_reference": float((outs["placed"] - want).abs().max() / want.abs().max()),
            }
        )
    )
    torch.distributed.barrier()


if __name__ == "__main__":
    prepare_process(machine_device())
    main(Path(sys.argv[1]))
