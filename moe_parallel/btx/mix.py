"""The BTX mix as a pure function of parameter tensors (names as on a 1-rank model).

BTX (arXiv 2403.07816, section 2.3): each layer's feed-forward block of branch i becomes expert i
of that layer; every other parameter (attention, norms, embeddings, output layer) is the
element-wise mean over the branches; the router is new (initialised like any router) and is
learned in the MoE finetune. Optionally the seed model itself becomes one more expert.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch

# An expert parameter of a Megatron MoE layer (SequentialMLP on one rank) and its dense twin.
_EXPERT = re.compile(
    r"^(?P<mlp>.*\.mlp)\.experts\.local_experts\.(?P<i>\d+)\.(?P<rest>linear_fc[12]\.(?:weight|bias))$"
)
_ROUTER = re.compile(r"\.mlp\.router\.")


class MixError(ValueError):
    """Branches that cannot be mixed into the MoE model asked for."""


def dense_name(expert_param: str) -> tuple[str, int] | None:
    """(the dense model's FFN parameter, expert index) for an expert parameter, else None."""
    match = _EXPERT.match(expert_param)
    if match is None:
        return None
    return f"{match['mlp']}.{match['rest']}", int(match["i"])


def mix(
    branches: Sequence[Mapping[str, torch.Tensor]],
    moe_params: Mapping[str, torch.Tensor],
    non_expert_from: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """New values for every MoE parameter except the routers (kept as initialised).

    ``branches``: one state per expert, in expert order (the seed first when it is an expert).
    ``moe_params``: the freshly built MoE model's parameters (for names, shapes and the router).
    ``non_expert_from``: take the non-expert parameters from this model (e.g. the seed) instead
    of the branches' mean.
    """
    if not branches:
        raise MixError("no branches to mix")
    names = set(branches[0])
    for i, branch in enumerate(branches[1:], start=1):
        if set(branch) != names:
            diff = sorted(set(branch) ^ names)[:5]
            raise MixError(
                f"branch {i} has other parameters than branch 0 (e.g. {diff}): "
                "every branch must come from the same dense config"
            )
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for name, target in moe_params.items():
        if _ROUTER.search(name):
            continue
        expert = dense_name(name)
        if expert is not None:
            source, i = expert
            if i >= len(branches):
                raise MixError(
                    f"the MoE model has expert {i} but only {len(branches)} branches "
                    f"were given: set model.moe.num_experts={len(branches)}"
                )
            value = take_matching(branches[i], source, target, name)
        elif non_expert_from is not None:
            value, source = take_matching(non_expert_from, name, target, name), name
        else:
            # BTX averages the non-expert parameters in fp32, then casts back.
            stack = [take_matching(b, name, target, name).float() for b in branches]
            value = torch.stack(stack).mean(0).to(target.dtype)
            source = name
        used.add(source)
        out[name] = value
    unused = sorted(names - used)
    if unused:
        raise MixError(
            f"branch parameters with no place in the MoE model: {unused[:5]} "
            "(does the MoE config have the dense config's layers and sizes, with "
            "model.moe.expert_ffn_hidden_size = the dense ffn_hidden_size?)"
        )
    return out


def take_matching(
    source_tensors: Mapping[str, torch.Tensor],
    source: str,
    target: torch.Tensor,
    name: str,
    owner: str = "the branches",
    error: type[MixError] = MixError,
) -> torch.Tensor:
    """A copy of ``source_tensors[source]`` for the target parameter ``name``, refused with
    ``error`` when ``owner`` (the branches, the dense model) lacks it or has another shape."""
    if source not in source_tensors:
        raise error(f"{name} needs {source}, missing from {owner}")
    value = source_tensors[source]
    if tuple(value.shape) != tuple(target.shape):
        raise error(
            f"{name} has shape {tuple(target.shape)} but {source} of {owner} has "
            f"{tuple(value.shape)}"
        )
    return value.detach().clone()
