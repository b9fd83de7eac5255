"""BTX mix as a pure function: experts are the branches' FFNs, the rest is their mean."""

from __future__ import annotations

import pytest
import torch

from moe_parallel.btx.mix import MixError, dense_name, mix

L0 = "module.decoder.layers.0"


def _dense(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = {
        f"{L0}.self_attention.linear_qkv.weight": (12, 4),
        f"{L0}.pre_mlp_layernorm.weight": (4,),
        f"{L0}.mlp.linear_fc1.weight": (16, 4),
        f"{L0}.mlp.linear_fc2.weight": (4, 8),
        "module.embedding.word_embeddings.weight": (10, 4),
    }
    return {k: torch.randn(*s, generator=g) for k, s in shapes.items()}


def _moe(experts: int) -> dict[str, torch.Tensor]:
    params = {k: torch.zeros_like(v) for k, v in _dense(0).items() if ".mlp." not in k}
    params[f"{L0}.mlp.router.weight"] = torch.full((experts, 4), 7.0)
    for i in range(experts):
        params[f"{L0}.mlp.experts.local_experts.{i}.linear_fc1.weight"] = torch.zeros(16, 4)
        params[f"{L0}.mlp.experts.local_experts.{i}.linear_fc2.weight"] = torch.zeros(4, 8)
    return params


def test_experts_are_the_branch_ffns_and_the_rest_is_the_mean():
    branches = [_dense(s) for s in (1, 2, 3)]
    out = mix(branches, _moe(3))
    for i, b in enumerate(branches):
        assert torch.equal(
            out[f"{L0}.mlp.experts.local_experts.{i}.linear_fc1.weight"],
            b[f"{L0}.mlp.linear_fc1.weight"],
        )
        assert torch.equal(
            out[f"{L0}.mlp.experts.local_experts.{i}.linear_fc2.weight"],
            b[f"{L0}.mlp.linear_fc2.weight"],
        )
    for name in (
        f"{L0}.self_attention.linear_qkv.weight",
        "module.embedding.word_embeddings.weight",
    ):
        mean = (branches[0][name] + branches[1][name] + branches[2][name]) / 3
        assert torch.allclose(out[name], mean, rtol=0, atol=1e-7)
    assert f"{L0}.mlp.router.weight" not in out  # stays as initialised


def test_names_map_to_the_dense_ffn():
    assert dense_name(f"{L0}.mlp.experts.local_experts.12.linear_fc2.weight") == (
        f"{L0}.mlp.linear_fc2.weight",
        12,
    )
    assert dense_name(f"{L0}.mlp.router.weight") is None


def test_mismatches_are_clear_errors():
    with pytest.raises(MixError, match="only 2 branches"):
        mix([_dense(1), _dense(2)], _moe(3))
    with pytest.raises(MixError, match="no place in the MoE model"):
        mix([_dense(1), _dense(2)], {k: v for k, v in _moe(2).items() if "fc2" not in k})
    bad = _dense(2)
    bad[f"{L0}.mlp.linear_fc1.weight"] = torch.zeros(8, 4)
    with pytest.raises(MixError, match=r"shape \(16, 4\)"):
        mix([_dense(1), bad], _moe(2))
    other = _dense(2)
    other["module.extra"] = torch.zeros(1)
    with pytest.raises(MixError, match="other parameters than branch 0"):
        mix([_dense(1), other], _moe(2))


def test_non_expert_parameters_can_come_from_the_seed():
    branches, seed = [_dense(s) for s in (1, 2)], _dense(9)
    out = mix(branches, _moe(2), non_expert_from=seed)
    for name in (f"{L0}.self_attention.linear_qkv.weight", f"{L0}.pre_mlp_layernorm.weight"):
        assert torch.equal(out[name], seed[name])
    assert torch.equal(
        out[f"{L0}.mlp.experts.local_experts.1.linear_fc1.weight"],
        branches[1][f"{L0}.mlp.linear_fc1.weight"],
    )  # experts still the branches'
