"""Hugging Face conversion without models: fused layouts, the architecture check, named errors."""

from __future__ import annotations

import json

import pytest
import torch

from launch.cli import main as moectl
from moe_parallel.config.schema import ModelConfig
from moe_parallel.convert import ARCHITECTURES, ConvertError, architecture_for, mixtral, qwen2_moe
from moe_parallel.convert.core import Rule, hf_shapes, hf_state, megatron_state, to_hf, to_megatron

GQA = ModelConfig(
    num_layers=1,
    hidden_size=12,
    ffn_hidden_size=8,
    num_attention_heads=6,
    num_query_groups=2,
    kv_channels=4,
    seq_length=8,
    vocab_size=10,
)


def test_qkv_is_interleaved_per_query_group_and_splits_back():
    n, g, d, h = 6, 2, 4, 12
    q = torch.arange(n * d * h, dtype=torch.float32).reshape(n * d, h)
    k = 1000 + torch.arange(g * d * h, dtype=torch.float32).reshape(g * d, h)
    v = 2000 + torch.arange(g * d * h, dtype=torch.float32).reshape(g * d, h)
    rule = Rule("qkv", ("q", "k", "v"), "qkv")
    fused = to_megatron(rule, [q, k, v], ((n + 2 * g) * d, h), GQA)
    per_group = (n // g + 2) * d  # rows of one query group: its 3 q heads, then k, then v
    for group in range(g):
        block = fused[group * per_group : (group + 1) * per_group]
        assert torch.equal(block[: n // g * d], q[group * n // g * d : (group + 1) * n // g * d])
        assert torch.equal(block[n // g * d : n // g * d + d], k[group * d : (group + 1) * d])
        assert torch.equal(block[n // g * d + d :], v[group * d : (group + 1) * d])
    back = to_hf(rule, fused, GQA, vocab=10)
    assert all(torch.equal(back[name], t) for name, t in zip("qkv", (q, k, v)))
    bias = to_megatron(rule, [q[:, 0], k[:, 0], v[:, 0]], ((n + 2 * g) * d,), GQA)
    assert torch.equal(bias, fused[:, 0])  # biases follow the same layout


def test_glu_stacks_gate_over_up_and_vocab_pads_with_zero_rows():
    gate, up = torch.randn(8, 12), torch.randn(8, 12)
    fc1 = to_megatron(Rule("fc1", ("g", "u"), "glu"), [gate, up], (16, 12), GQA)
    assert torch.equal(fc1[:8], gate) and torch.equal(fc1[8:], up)
    emb = torch.randn(10, 12)
    padded = to_megatron(Rule("emb", ("e",), "vocab"), [emb], (128, 12), GQA)
    assert torch.equal(padded[:10], emb) and padded[10:].abs().max().item() == 0.0
    assert torch.equal(to_hf(Rule("emb", ("e",), "vocab"), padded, GQA, vocab=10)["e"], emb)


class FakeWeights:
    def __init__(self, tensors):
        self.tensors = tensors

    def names(self):
        return set(self.tensors)

    def get(self, name, wanted_by):
        if name not in self.tensors:
            raise ConvertError(f"tensor {name} is missing (needed for {wanted_by})")
        return self.tensors[name]


def _mixtral_model() -> ModelConfig:
    hf = {
        "architectures": ["MixtralForCausalLM"],
        "vocab_size": 10,
        "hidden_size": 12,
        "intermediate_size": 8,
        "num_hidden_layers": 2,
        "num_attention_heads": 6,
        "num_key_value_heads": 2,
        "head_dim": 4,
        "num_local_experts": 3,
        "num_experts_per_tok": 2,
        "max_position_embeddings": 32,
        "rope_theta": 1e6,
    }
    return ModelConfig(**mixtral.model_section(hf))


def test_a_whole_model_round_trips_and_errors_name_the_tensor():
    model = _mixtral_model()
    assert model.rotary_base == 1e6 and model.moe.pre_softmax is False
    rules = mixtral.rules(model)
    torch.manual_seed(0)
    hf, targets = {}, {}
    # Shapes of the Megatron parameters as the 1-rank model has them.
    for rule in rules:
        if rule.kind == "vocab":
            targets[rule.megatron] = (128, 12)
        elif rule.kind == "qkv":
            targets[rule.megatron] = ((6 + 2 * 2) * 4, 12)
        elif rule.megatron.endswith("linear_proj.weight"):
            targets[rule.megatron] = (12, 24)
        elif rule.kind == "glu":
            targets[rule.megatron] = (16, 12)
        elif rule.megatron.endswith("linear_fc2.weight"):
            targets[rule.megatron] = (12, 8)
        elif rule.megatron.endswith("router.weight"):
            targets[rule.megatron] = (3, 12)
        else:
            targets[rule.megatron] = (12,)
    for rule in rules:
        for name, shape in hf_shapes(rule, targets[rule.megatron], model).items():
            hf[name] = torch.randn(shape)
    assert "model.layers.1.block_sparse_moe.experts.2.w3.weight" in hf
    ours = megatron_state(rules, model, FakeWeights(hf), targets)
    back = hf_state(rules, model, ours, vocab=10)
    assert set(back) == set(hf) and all(torch.equal(back[k], hf[k]) for k in hf)

    missing = dict(hf)
    del missing["model.layers.1.self_attn.k_proj.weight"]
    with pytest.raises(
        ConvertError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight is missing"
    ):
        megatron_state(rules, model, FakeWeights(missing), targets)
    wrong = dict(hf)
    wrong["model.layers.0.block_sparse_moe.experts.1.w2.weight"] = torch.randn(12, 9)
    with pytest.raises(
        ConvertError, match=r"experts\.1\.w2\.weight has shape \(12, 9\), expected \(12, 8\)"
    ):
        megatron_state(rules, model, FakeWeights(wrong), targets)


def test_qwen2_moe_layer_pattern_router_and_shared_gate():
    hf = {
        "architectures": ["Qwen2MoeForCausalLM"],
        "vocab_size": 10,
        "hidden_size": 12,
        "intermediate_size": 16,
        "moe_intermediate_size": 8,
        "shared_expert_intermediate_size": 20,
        "num_hidden_layers": 4,
        "num_attention_heads": 6,
        "num_key_value_heads": 2,
        "num_experts": 3,
        "num_experts_per_tok": 2,
        "decoder_sparse_step": 2,
        "mlp_only_layers": [3],
        "norm_topk_prob": False,
        "rope_parameters": {"rope_theta": 1e6, "rope_type": "default"},
    }
    model = ModelConfig(**qwen2_moe.model_section(hf))
    # Sparse when (i+1) % step == 0 and not in mlp_only_layers: only layer 1.
    assert model.moe.layer_freq == [0, 1, 0, 0]
    assert model.moe.pre_softmax is True and model.moe.shared_expert_gate is True
    assert model.add_qkv_bias and model.moe.expert_ffn_hidden_size == 8
    back = qwen2_moe.hf_config(model, "float32")
    assert back["mlp_only_layers"] == [0, 2, 3] and back["norm_topk_prob"] is False
    assert mixtral.limits(model)  # a shared expert: not a Mixtral
    names = {r.megatron for r in qwen2_moe.rules(model)}
    assert "decoder.layers.1.mlp.shared_experts.gate_weight" in names
    assert "decoder.layers.0.mlp.linear_fc1.weight" in names


def test_unsupported_architecture_is_refused_before_any_work(tmp_path, capsys):
    src = tmp_path / "llama"
    src.mkdir()
    (src / "config.json").write_text(
        json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 8})
    )
    with pytest.raises(ConvertError) as err:
        architecture_for(json.loads((src / "config.json").read_text()), str(src))
    assert "LlamaForCausalLM" in str(err.value)
    assert all(name in str(err.value) for name in ARCHITECTURES)
    out = tmp_path / "out"
    assert moectl(["convert", str(src), str(out)]) == 2
    message = capsys.readouterr().err
    assert "architecture LlamaForCausalLM is not supported" in message
    assert "MixtralForCausalLM, Qwen2MoeForCausalLM" in message
    assert not out.exists()  # refused before anything was written


def test_phimoe_is_the_only_architecture_for_a_grin_model():
    from moe_parallel.config import load_config
    from moe_parallel.convert import mixtral, phimoe, qwen2_moe
    from tests.conftest import REPO

    grin = load_config(REPO / "configs" / "tiny" / "grin_moe_tiny.yaml").model
    assert phimoe.limits(grin) == []
    assert any("router='sparsemixer'" in r for r in mixtral.limits(grin))
    assert qwen2_moe.limits(grin)
    # and back: the HF config of the GRIN twin maps to the same model section
    section = phimoe.model_section(
        {
            **phimoe.hf_config(grin.model_copy(update={"vocab_size": 512}), "float32"),
            "num_hidden_layers": grin.num_layers,
        }
    )
    assert section["moe"]["router"] == "sparsemixer" and section["normalization"] == "LayerNorm"
    assert section["attention_output_bias"] and section["output_layer_bias"]
    assert section["moe"]["input_jitter_eps"] == grin.moe.input_jitter_eps
    names = {r.megatron for r in phimoe.rules(grin)}
    assert (
        "output_layer.bias" in names and "decoder.layers.0.self_attention.linear_proj.bias" in names
    )
