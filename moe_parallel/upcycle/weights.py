"""Upcycling as a pure function of parameter tensors (names as on a 1-rank model).

- **Sparse upcycling** (Komatsuzaki et al., arXiv 2212.05055): every expert of an MoE layer is a
  copy of that layer's dense FFN; every other parameter is the dense model's; the routers are
  new. This is the BTX mix (btx/mix.py) with one branch repeated and the non-expert parameters
  taken from it, so it reuses that function.
- **PESC** (Wu et al., arXiv 2401.02731): the dense FFN becomes the shared FFN of an adapter MoE
  layer (``mlp.shared_ffn``, model/layers/adapter_experts.py); each adapter's up projection
  ``W_up`` (``linear_fc2``) is zero, so at initialisation every adapter is the identity
  A_i(h) = h and the layer's output is the dense FFN's; ``W_down`` (``linear_fc1``) and the
  routers keep their fresh initialisation.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from ..btx.mix import MixError, mix, take_matching

_ROUTER = re.compile(r"\.mlp\.router\.")
_SHARED_FFN = re.compile(
    r"^(?P<mlp>.*\.mlp)\.shared_ffn\.(?P<rest>linear_fc[12]\.(?:weight|bias))$"
)
_ADAPTER = re.compile(r"\.mlp\.experts\.local_experts\.\d+\.linear_fc(?P<fc>[12])\.weight$")


class UpcycleError(MixError):
    """A dense model that cannot become the MoE model asked for."""


def upcycle(
    dense: Mapping[str, torch.Tensor],
    moe_params: Mapping[str, torch.Tensor],
    num_experts: int,
    kind: str,
) -> dict[str, torch.Tensor]:
    """New values for the MoE parameters; those left out (routers, PESC's ``W_down``) keep
    their initialisation. ``kind``: ``ffn`` (sparse upcycling) or ``adapter`` (PESC)."""
    if kind == "ffn":
        try:
            return mix([dense] * num_experts, moe_params, non_expert_from=dense)
        except MixError as exc:
            raise UpcycleError(str(exc)) from exc
    if kind != "adapter":
        raise UpcycleError(f"model.moe.expert_kind={kind!r}: allowed values are 'ffn', 'adapter'")
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for name, target in moe_params.items():
        if _ROUTER.search(name):
            continue
        adapter = _ADAPTER.search(name)
        if adapter is not None:
            if adapter["fc"] == "2":  # W_up = 0: every adapter starts as the identity
                out[name] = torch.zeros_like(target)
            continue
        shared = _SHARED_FFN.match(name)
        source = f"{shared['mlp']}.{shared['rest']}" if shared else name
        out[name] = take_matching(dense, source, target, name, "the dense model", UpcycleError)
        used.add(source)
    unused = sorted(set(dense) - used)
    if unused:
        raise UpcycleError(
            f"dense parameters with no place in the MoE model: {unused[:5]} (does "
            "the MoE config have the dense config's layers and sizes, with "
            "model.moe.expert_ffn_hidden_size = the dense ffn_hidden_size?)"
        )
    return out
