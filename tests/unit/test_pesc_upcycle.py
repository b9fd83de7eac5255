"""PESC / Camelidae and sparse upcycling without ranks: parameter counts of the full-scale
configs, the config rules, and the upcycling weight map."""

from __future__ import annotations

import pytest
import torch

from moe_parallel.config import load_config
from moe_parallel.config.load import ConfigError
from moe_parallel.plan.params import count_parameters
from moe_parallel.upcycle.cli import output_preserved
from moe_parallel.upcycle.weights import UpcycleError, upcycle
from tests.conftest import REPO

MODELS = REPO / "configs" / "models"
TWIN = REPO / "configs" / "tiny" / "camelidae_tiny.yaml"
LLAMA2_7B = 6_738_415_616  # meta-llama/Llama-2-7b-hf, every tensor counted


# (config, published total, published active): PESC-P Table 2 gives whole billions ("8B / 7B"),
# so a count meets a figure when it rounds to it (1% of 8B is below the paper's precision).
# Exception: 8x13B's "14B active" is not a rounding of any count: Llama-2-13B alone is 13.02B and
# two active 512-wide adapters per layer add 0.17B (+ routers), i.e. 13.44B; the paper seems to
# round up there (it rounds 7.008B down to 7B), so that figure is only checked to lie in (13, 14].
PUBLISHED = [("camelidae_8x7b", 8, 7), ("camelidae_8x13b", 15, None), ("camelidae_8x34b", 38, 35)]


@pytest.mark.parametrize("name,total,active", PUBLISHED, ids=[p[0] for p in PUBLISHED])
def test_camelidae_counts_round_to_the_published_figures(name, total, active):
    count = count_parameters(load_config(MODELS / f"{name}.yaml").model)
    assert round(count.total / 1e9) == total, count.total
    if active is None:
        assert 13e9 < count.active <= 14e9, count.active
    else:
        assert round(count.active / 1e9) == active, count.active
    assert count.active < count.total


def test_camelidae_8x7b_is_llama2_7b_plus_adapters_and_routers_exactly():
    """The base model's count plus, per layer, 8 adapters (2 d a) and a router (d 8): 7.813B
    total, and 2 adapters active (7.008B)."""
    model = load_config(MODELS / "camelidae_8x7b.yaml").model
    count = count_parameters(model)
    d, a, L = 4096, 512, 32
    assert count_parameters(load_config(MODELS / "llama2_7b.yaml").model).total == LLAMA2_7B
    assert count.total == LLAMA2_7B + L * (8 * 2 * d * a + 8 * d)
    assert count.active == LLAMA2_7B + L * (2 * 2 * d * a + 8 * d)
    assert abs(count.total / 7.813e9 - 1) < 1e-3 and abs(count.active / 7.008e9 - 1) < 1e-3


def test_adapter_config_rules():
    with pytest.raises(ConfigError, match="needs model.moe.adapter_dim"):
        load_config(TWIN, ["model.moe.adapter_dim=null"])
    with pytest.raises(ConfigError, match="is for model.moe.expert_kind=adapter"):
        load_config(TWIN, ["model.moe.expert_kind=ffn"])
    with pytest.raises(ConfigError, match="needs adapter experts"):
        load_config(
            REPO / "configs" / "tiny" / "moe_tiny.yaml", ["train.trainable=adapters_and_routers"]
        )
    with pytest.raises(ConfigError, match="recompute=full"):
        load_config(TWIN, ["train.trainable=adapters_and_routers", "train.recompute=full"])
    with pytest.raises(ConfigError, match="adapter_dim=15 is not divisible"):
        load_config(
            TWIN,
            [
                "model.moe.adapter_dim=15",
                "parallel.tensor=2",
                "parallel.sequence_parallel=true",
                "parallel.data=1",
                "parallel.expert=1",
            ],
        )
    with pytest.raises(ConfigError, match="unset shared_expert_ffn_hidden_size"):
        load_config(TWIN, ["model.moe.shared_expert_ffn_hidden_size=64"])


def test_output_preserved_only_with_weights_summing_to_one_and_no_dropping():
    assert output_preserved(load_config(TWIN))[0]
    assert not output_preserved(load_config(TWIN, ["model.moe.pre_softmax=true"]))[0]
    assert not output_preserved(load_config(TWIN, ["model.moe.capacity_factor=1.0"]))[0]


def _dense(layers=2, d=4, f=6):
    g = torch.Generator().manual_seed(0)
    out = {"embedding.word_embeddings.weight": torch.randn(10, d, generator=g)}
    for i in range(layers):
        out[f"decoder.layers.{i}.mlp.linear_fc1.weight"] = torch.randn(2 * f, d, generator=g)
        out[f"decoder.layers.{i}.mlp.linear_fc2.weight"] = torch.randn(d, f, generator=g)
        out[f"decoder.layers.{i}.self_attention.linear_qkv.weight"] = torch.randn(
            3 * d, d, generator=g
        )
    return out


def test_upcycle_weights_plain_and_pesc():
    dense = _dense()
    E = 3
    moe = {"embedding.word_embeddings.weight": torch.zeros(10, 4)}
    pesc = dict(moe)
    for i in range(2):
        L = f"decoder.layers.{i}"
        moe[f"{L}.mlp.router.weight"] = torch.full((E, 4), 0.5)
        pesc[f"{L}.mlp.router.weight"] = torch.full((E, 4), 0.5)
        moe[f"{L}.self_attention.linear_qkv.weight"] = torch.zeros(12, 4)
        pesc[f"{L}.self_attention.linear_qkv.weight"] = torch.zeros(12, 4)
        pesc[f"{L}.mlp.shared_ffn.linear_fc1.weight"] = torch.zeros(12, 4)
        pesc[f"{L}.mlp.shared_ffn.linear_fc2.weight"] = torch.zeros(4, 6)
        for e in range(E):
            moe[f"{L}.mlp.experts.local_experts.{e}.linear_fc1.weight"] = torch.zeros(12, 4)
            moe[f"{L}.mlp.experts.local_experts.{e}.linear_fc2.weight"] = torch.zeros(4, 6)
            pesc[f"{L}.mlp.experts.local_experts.{e}.linear_fc1.weight"] = torch.ones(2, 4)
            pesc[f"{L}.mlp.experts.local_experts.{e}.linear_fc2.weight"] = torch.ones(4, 2)
    plain = upcycle(dense, moe, E, "ffn")
    assert not any(".router." in k for k in plain)
    for e in range(E):
        assert torch.equal(
            plain[f"decoder.layers.1.mlp.experts.local_experts.{e}.linear_fc2.weight"],
            dense["decoder.layers.1.mlp.linear_fc2.weight"],
        )
    assert torch.equal(
        plain["embedding.word_embeddings.weight"], dense["embedding.word_embeddings.weight"]
    )
    adapters = upcycle(dense, pesc, E, "adapter")
    assert torch.equal(
        adapters["decoder.layers.0.mlp.shared_ffn.linear_fc1.weight"],
        dense["decoder.layers.0.mlp.linear_fc1.weight"],
    )
    assert not adapters["decoder.layers.0.mlp.experts.local_experts.2.linear_fc2.weight"].any()
    assert "decoder.layers.0.mlp.experts.local_experts.2.linear_fc1.weight" not in adapters  # fresh
    with pytest.raises(UpcycleError, match="no place in the MoE model"):
        upcycle({**dense, "extra.weight": torch.zeros(1)}, pesc, E, "adapter")
    with pytest.raises(UpcycleError, match="has shape"):
        upcycle(
            dense, {**pesc, "embedding.word_embeddings.weight": torch.zeros(10, 5)}, E, "adapter"
        )
