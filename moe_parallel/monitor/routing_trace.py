"""Routing traces: which experts every token was sent to, per MoE layer, in one ``.npz`` file.

Format (``numpy.savez_compressed``; read with :func:`load_trace` or plain ``numpy.load``):

- ``experts_L{layer}``: int32 ``[tokens, top_k]``, the experts chosen for each token of MoE layer
  ``layer`` (global layer number, 1-based as Megatron counts), ascending expert id per token
  (Megatron's routing map is a token x expert mask: the router's ranking is not kept). Tokens are in forward order: for each forward
  (training micro-batch or generation step) its tokens in Megatron's ``[sequence, batch]``
  flattening (token ``s * B + b``), forwards appended one after another.
- ``probs_L{layer}`` (optional): float32 ``[tokens, top_k]``, the routing weight of each chosen
  expert (the router's probability after its normalisation), same order as ``experts_L{layer}``.
- ``meta``: a 0-d string array holding JSON: at least ``format`` ("moe-parallel-trace/1"),
  ``num_experts``, ``top_k``, ``layers`` (list of ints); writers add what they know (``source``,
  ``run``, ``step``, ``forwards`` = tokens per forward, ``gating``...).

A consumer (expert-buffering cache simulation, placement) iterates ``trace.layers[layer]`` rows:
one row per token, its ``top_k`` expert ids.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

FORMAT = "moe-parallel-trace/1"

# Legend: T tokens, K top_k, E experts.


@dataclass
class RoutingTrace:
    layers: dict[int, np.ndarray]  # layer -> experts_TK (int32)
    meta: dict = field(default_factory=dict)
    probs: dict[int, np.ndarray] = field(default_factory=dict)  # layer -> probs_TK (float32)

    @property
    def num_experts(self) -> int:
        if "num_experts" in self.meta:
            return int(self.meta["num_experts"])
        return int(max(int(a.max()) for a in self.layers.values() if a.size)) + 1

    def tokens_per_expert(self, layer: int) -> np.ndarray:
        """Routed token count per expert of ``layer`` over the whole trace: int64 [E]."""
        return np.bincount(self.layers[layer].reshape(-1), minlength=self.num_experts)

    def forwards(self, layer: int) -> Iterator[np.ndarray]:
        """The trace of ``layer`` cut into its forwards (``meta['forwards']`` token counts)."""
        sizes = self.meta.get("forwards") or [len(self.layers[layer])]
        start = 0
        for n in sizes:
            yield self.layers[layer][start : start + n]
            start += n


def save_trace(
    path: str | Path,
    layers: dict[int, np.ndarray],
    meta: dict | None = None,
    probs: dict[int, np.ndarray] | None = None,
) -> Path:
    """Write ``layers`` (layer -> int array [tokens, top_k]) and ``meta`` to ``path`` (.npz)."""
    path = Path(path)
    meta = dict(meta or {})
    arrays: dict[str, np.ndarray] = {}
    top_k = None
    for layer, experts in layers.items():
        experts = np.asarray(experts)
        if experts.ndim != 2 or not np.issubdtype(experts.dtype, np.integer):
            raise ValueError(
                f"trace layer {layer}: expected an int array [tokens, top_k], got "
                f"{experts.dtype} {experts.shape}"
            )
        if top_k is not None and experts.shape[1] != top_k:
            raise ValueError(f"trace layer {layer}: top_k {experts.shape[1]} != {top_k}")
        top_k = experts.shape[1]
        arrays[f"experts_L{int(layer)}"] = experts.astype(np.int32)
    for layer, p in (probs or {}).items():
        p = np.asarray(p, dtype=np.float32)
        if p.shape != arrays[f"experts_L{int(layer)}"].shape:
            raise ValueError(
                f"trace layer {layer}: probs {p.shape} != experts "
                f"{arrays[f'experts_L{int(layer)}'].shape}"
            )
        arrays[f"probs_L{int(layer)}"] = p
    meta.setdefault("format", FORMAT)
    meta.setdefault("layers", sorted(int(k) for k in layers))
    if top_k is not None:
        meta.setdefault("top_k", int(top_k))
    arrays["meta"] = np.array(json.dumps(meta))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:  # a file object: numpy adds no ".npz" to the name
        np.savez_compressed(f, **arrays)
    return path


def load_trace(path: str | Path) -> RoutingTrace:
    """Read a trace written by :func:`save_trace`."""
    with np.load(Path(path), allow_pickle=False) as data:
        meta = json.loads(str(data["meta"])) if "meta" in data.files else {}
        if meta.get("format", FORMAT) != FORMAT:
            raise ValueError(f"{path}: trace format {meta.get('format')!r}, expected {FORMAT!r}")
        layers = {
            int(k[len("experts_L") :]): data[k] for k in data.files if k.startswith("experts_L")
        }
        probs = {int(k[len("probs_L") :]): data[k] for k in data.files if k.startswith("probs_L")}
    return RoutingTrace(dict(sorted(layers.items())), meta, dict(sorted(probs.items())))
