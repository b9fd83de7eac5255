"""Expert load balancing (Huang et al., arXiv 2303.06182): placing experts on EP ranks from
recorded routing statistics, and applying a placement to a layer or a checkpoint's weights.

A placement of one layer is ``perm``: a list of E logical expert ids in *physical* order. Rank r
of R holds physical slots ``r*E/R .. (r+1)*E/R - 1`` (Megatron's contiguous EP sharding), so the
default placement is ``perm = [0, 1, ..., E-1]``. Applying a placement to a Megatron MoE layer
moves logical expert ``perm[p]``'s weights into local expert ``p`` and the router's row
``perm[p]`` to row ``p``: each token picks the same experts with the same weights, so the layer's
outputs are unchanged, only which rank computes what changes.

Methods (equal experts per rank, a multi-way number partitioning):
- ``greedy``: experts sorted by mean load (descending), each to the least-loaded rank with room.
- ``anti_correlation``: as greedy, but a rank's load is judged as its load plus
  ``alpha * sum_j corr(e, j) * load_j`` over the experts j already there (Pearson correlation of
  per-batch loads; the paper uses alpha = 0.5), so experts that fire together are spread.

Legend: B batches, E experts, R ranks.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

PLACEMENT_FILE = "placement.json"
FORMAT = "moe-parallel-placement/1"


def batch_loads(experts_TK_batches: Iterable[np.ndarray], num_experts: int) -> np.ndarray:
    """Routed tokens per expert per batch: int64 [B, E]."""
    return np.stack(
        [np.bincount(np.asarray(b).reshape(-1), minlength=num_experts) for b in experts_TK_batches]
    )


def contiguous_placement(num_experts: int) -> list[int]:
    return list(range(num_experts))


def _check(num_experts: int, ranks: int) -> int:
    if ranks < 1 or num_experts % ranks:
        raise ValueError(f"ranks={ranks}: the expert count {num_experts} must divide evenly")
    return num_experts // ranks


def greedy_placement(load_E: np.ndarray, ranks: int) -> list[int]:
    return anti_correlation_placement(np.asarray(load_E, float)[None, :], ranks, alpha=0.0)


def anti_correlation_placement(loads_BE: np.ndarray, ranks: int, alpha: float = 0.5) -> list[int]:
    loads_BE = np.asarray(loads_BE, dtype=float)
    num_experts = loads_BE.shape[1]
    per_rank = _check(num_experts, ranks)
    mean_E = loads_BE.mean(0)
    corr_EE = np.zeros((num_experts, num_experts))
    if alpha and loads_BE.shape[0] > 1:
        with np.errstate(invalid="ignore", divide="ignore"):
            corr_EE = np.nan_to_num(np.corrcoef(loads_BE, rowvar=False))
    members: list[list[int]] = [[] for _ in range(ranks)]
    rank_load = np.zeros(ranks)
    for e in sorted(range(num_experts), key=lambda e: (-mean_E[e], e)):

        def judged(r: int) -> float:
            return rank_load[r] + alpha * sum(corr_EE[e, j] * mean_E[j] for j in members[r])

        r = min(
            (r for r in range(ranks) if len(members[r]) < per_rank), key=lambda r: (judged(r), r)
        )
        members[r].append(e)
        rank_load[r] += mean_E[e]
    return [e for m in members for e in sorted(m)]


def rank_loads(loads_BE: np.ndarray, perm: list[int], ranks: int) -> np.ndarray:
    """Tokens each rank computes per batch under ``perm``: [B, R]."""
    per_rank = _check(len(perm), ranks)
    loads_BE = np.atleast_2d(loads_BE)
    return np.stack(
        [loads_BE[:, perm[r * per_rank : (r + 1) * per_rank]].sum(1) for r in range(ranks)], axis=1
    )


def imbalance(loads_BE: np.ndarray, perm: list[int], ranks: int) -> dict:
    """max/mean rank load: of the whole trace's totals, and per batch averaged over batches
    (what a synchronous step waits for), plus the largest rank's share of all tokens."""
    per_batch = rank_loads(loads_BE, perm, ranks).astype(float)
    total = per_batch.sum(0)
    ratio_B = per_batch.max(1) / np.maximum(per_batch.mean(1), 1e-12)
    return {
        "total_max_over_mean": float(total.max() / total.mean()),
        "batch_max_over_mean": float(ratio_B.mean()),
        "max_rank_share": float(total.max() / total.sum()),
    }


# ---------------------------------------------------------------------------------------------
# Applying a placement: a Megatron MoE layer, a state dict, placement.json
# ---------------------------------------------------------------------------------------------
def permute_moe_layer(layer: torch.nn.Module, perm: list[int]) -> None:
    """In place: local expert p <- logical expert perm[p]; router rows likewise (1 EP rank)."""
    experts = list(layer.experts.local_experts)
    if sorted(perm) != list(range(len(experts))):
        raise ValueError(f"placement {perm} is not a permutation of {len(experts)} experts")
    with torch.no_grad():
        old = [{n: t.clone() for n, t in e.named_parameters()} for e in experts]
        for p, e in enumerate(perm):
            for name, t in experts[p].named_parameters():
                t.copy_(old[e][name])
        _permute_router(layer.router, perm)


def _permute_router(router: torch.nn.Module, perm: list[int]) -> None:
    """Router row p <- row perm[p] (weights, DeepSeek's expert bias, a bias), in place."""
    for name in ("weight", "expert_bias", "bias"):
        t = getattr(router, name, None)
        if isinstance(t, torch.Tensor) and t.shape[0] == len(perm):
            t.copy_(t[perm].clone())


def permute_state_dict(
    state: dict[str, torch.Tensor],
    layer_perms: dict[int, list[int]],
    prefix: str = "decoder.layers.{layer}.mlp.",
) -> dict[str, torch.Tensor]:
    """A copy of a whole-model state dict (global expert numbering, Megatron names) with each
    listed layer's experts and router rows permuted; ``layer`` 0-based as in the names."""
    out = dict(state)
    for layer, perm in layer_perms.items():
        base = prefix.format(layer=layer)
        for p, e in enumerate(perm):
            src = f"{base}experts.local_experts.{e}."
            for key in [k for k in state if k.startswith(src)]:
                out[f"{base}experts.local_experts.{p}.{key[len(src) :]}"] = state[key]
        for name in ("router.weight", "router.expert_bias"):
            if base + name in state:
                out[base + name] = state[base + name][perm]
    return out


def save_placement(
    checkpoint_dir: str | Path,
    layer_perms: dict[int, list[int]],
    ranks: int,
    method: str,
    stats: dict | None = None,
) -> Path:
    """``placement.json`` next to (inside) a checkpoint directory."""
    return write_placement_file(
        Path(checkpoint_dir) / PLACEMENT_FILE, layer_perms, ranks, method, stats
    )


def write_placement_file(
    path: str | Path,
    layer_perms: dict[int, list[int]],
    ranks: int,
    method: str,
    stats: dict | None = None,
) -> Path:
    path = Path(path)
    path.write_text(
        json.dumps(
            {
                "format": FORMAT,
                "ranks": ranks,
                "method": method,
                "layers": {str(k): list(map(int, v)) for k, v in layer_perms.items()},
                "stats": stats or {},
            },
            indent=1,
        )
    )
    return path


def load_placement(checkpoint_dir: str | Path) -> dict[int, list[int]] | None:
    """The placement saved with a checkpoint (layer -> perm), or None when there is none."""
    path = Path(checkpoint_dir) / PLACEMENT_FILE
    if not path.is_file():
        return None
    return {int(k): v for k, v in load_placement_file(path)["layers"].items()}


def load_placement_file(path: str | Path) -> dict:
    """A placement.json's contents (format checked): ranks, method, layers, stats."""
    data = json.loads(Path(path).read_text())
    if data.get("format") != FORMAT:
        raise ValueError(f"{path}: format {data.get('format')!r}, expected {FORMAT!r}")
    return data


def moe_layers(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """0-based global layer index -> the MoE layer (``mlp`` with experts and a router)."""
    found = {}
    for layer in model.decoder.layers:
        mlp = getattr(layer, "mlp", None)
        if hasattr(mlp, "experts") and hasattr(mlp, "router"):
            found[layer.layer_number - 1] = mlp
    return found


def place_experts(model: torch.nn.Module, layer_perms: dict[int, list[int]]) -> None:
    """Apply a placement to a model sharded over the expert-parallel ranks (call on every rank).

    Each expert parameter is all-gathered over the EP group (global expert order), then local
    expert i of EP rank r takes logical expert ``perm[r * E_local + i]``; router rows are
    permuted likewise (the router is replicated). Memory: one layer's experts at a time."""
    from megatron.core import parallel_state

    group = parallel_state.get_expert_model_parallel_group()
    ep = parallel_state.get_expert_model_parallel_world_size()
    rank = parallel_state.get_expert_model_parallel_rank()
    layers = moe_layers(model)
    for index, perm in sorted(layer_perms.items()):
        if index not in layers:
            raise ValueError(
                f"placement names layer {index} but the model's MoE layers are "
                f"{sorted(layers)} (0-based)"
            )
        layer = layers[index]
        local = getattr(layer.experts, "local_experts", None)
        if local is None:
            raise ValueError(
                f"placement needs SequentialMLP experts (model.moe.grouped_gemm="
                f"false); layer {index} has {type(layer.experts).__name__}"
            )
        num_experts = len(local) * ep
        if sorted(perm) != list(range(num_experts)):
            raise ValueError(
                f"placement of layer {index} is not a permutation of its "
                f"{num_experts} experts: {perm}"
            )
        mine = perm[rank * len(local) : (rank + 1) * len(local)]
        with torch.no_grad():
            for name, _ in local[0].named_parameters():
                stacked = torch.stack([dict(e.named_parameters())[name] for e in local])
                if ep > 1:
                    parts = [torch.empty_like(stacked) for _ in range(ep)]
                    torch.distributed.all_gather(parts, stacked.contiguous(), group=group)
                    stacked = torch.cat(parts)
                for i, expert in enumerate(local):
                    dict(expert.named_parameters())[name].copy_(stacked[mine[i]])
            _permute_router(layer.router, perm)
