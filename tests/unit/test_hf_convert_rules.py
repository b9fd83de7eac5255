"""Hugging Face conversion without models: fused layouts, the architecture check, named errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from launch.cli import main as moectl
from moe_parallel.config.schema import ModelConfig
from moe_parallel.convert import (
    ARCHITECTURES,
    ConvertError,
    architecture_for,
    mixtral,
    phimoe,
    qwen2_moe,
)
from moe_parallel.convert.cli import run_job, staged_output
from moe_parallel.convert.core import Rule, hf_shapes, hf_state, megatron_state, to_hf, to_megatron
from moe_parallel.convert.hf_files import HFWeights

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


# config.json of a tiny model of each architecture: its sizes and nothing else (every other
# field takes transformers' default).
TINY_SIZES = {"vocab_size": 200, "hidden_size": 16, "intermediate_size": 24}
TINY_SIZES.update(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
TINY = {
    "MixtralForCausalLM": {**TINY_SIZES, "num_local_experts": 3},
    "PhimoeForCausalLM": {**TINY_SIZES, "num_local_experts": 3},
    "Qwen2MoeForCausalLM": {
        **TINY_SIZES,
        "num_experts": 3,
        "moe_intermediate_size": 8,
        "shared_expert_intermediate_size": 12,
    },
    "Qwen3MoeForCausalLM": {**TINY_SIZES, "num_experts": 3, "moe_intermediate_size": 8},
    "OlmoeForCausalLM": {**TINY_SIZES, "num_experts": 3},
}
TINY_LATENT = {**TINY_SIZES, "num_key_value_heads": 4, "n_routed_experts": 4}
TINY_LATENT.update(moe_intermediate_size=8, kv_lora_rank=8, qk_nope_head_dim=4)
TINY_LATENT.update(qk_rope_head_dim=2, v_head_dim=4, first_k_dense_replace=1)
TINY["DeepseekV3ForCausalLM"] = {**TINY_LATENT, "n_group": 2, "topk_group": 1}
TINY["DeepseekV3ForCausalLM"].update(num_experts_per_tok=2)
TINY["DeepseekV2ForCausalLM"] = {**TINY_LATENT, "num_experts_per_tok": 2}
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0}
YARN.update(original_max_position_embeddings=4096, mscale=1.0, mscale_all_dim=1.0)


def _tiny_config(arch: str) -> dict:
    return {"architectures": [arch], **TINY[arch]}


@pytest.mark.parametrize(
    "arch, field",
    [(arch, field) for arch, module in ARCHITECTURES.items() for field in module.REQUIRED],
)
def test_a_config_without_a_size_is_refused_in_one_line_before_anything_is_written(
    tmp_path, capsys, arch, field
):
    src = tmp_path / "hf"
    src.mkdir()
    config = _tiny_config(arch)
    del config[field]
    (src / "config.json").write_text(json.dumps(config))
    assert moectl(["convert", str(src), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"moectl: error: {src / 'config.json'}: missing {field}: {arch}"), err
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]  # no OUT, no partial output


def _rope_theta_default(config) -> float:
    """transformers 5 keeps it in rope_parameters, 4 as an attribute."""
    return (getattr(config, "rope_parameters", None) or {}).get("rope_theta") or config.rope_theta


@pytest.mark.parametrize("module", [mixtral, phimoe, qwen2_moe])
def test_fields_config_json_leaves_out_take_the_transformers_class_defaults(module):
    import transformers

    section = module.model_section(_tiny_config(module.HF_CLASS))
    defaults = getattr(transformers, module.CONFIG_CLASS)()
    assert section["rotary_base"] == _rope_theta_default(defaults)
    assert section["norm_epsilon"] == defaults.rms_norm_eps
    assert section["moe"]["aux_loss_coeff"] == defaults.router_aux_loss_coef
    assert section["moe"]["top_k"] == defaults.num_experts_per_tok
    assert section["max_position_embeddings"] == defaults.max_position_embeddings
    assert section["tie_embeddings"] == defaults.tie_word_embeddings


def test_mixtral_defaults_are_transformers_not_llama_constants():
    """transformers' MixtralConfig: rope_theta 1e6, rms_norm_eps 1e-5 (a converted Mixtral with
    1e4 and 1e-6 has logits off by up to 3.4); a value the file gives wins, in either place
    transformers 4 (top level) or 5 (rope_parameters) writes it."""
    section = mixtral.model_section(_tiny_config("MixtralForCausalLM"))
    assert section["rotary_base"] == 1e6 and section["norm_epsilon"] == 1e-5
    given = {**_tiny_config("MixtralForCausalLM"), "rope_theta": 5000.0, "rms_norm_eps": 1e-6}
    section = mixtral.model_section(given)
    assert section["rotary_base"] == 5000.0 and section["norm_epsilon"] == 1e-6
    v5 = {**_tiny_config("MixtralForCausalLM"), "rope_parameters": {"rope_theta": 7000.0}}
    assert mixtral.model_section(v5)["rotary_base"] == 7000.0


def test_a_config_transformers_refuses_is_refused_with_its_reason_in_one_line():
    bad = {**_tiny_config("Qwen2MoeForCausalLM"), "layer_types": ["full_attention"]}
    with pytest.raises(ConvertError, match="^transformers' Qwen2MoeConfig refuses it: ") as err:
        qwen2_moe.model_section(bad)
    assert "\n" not in str(err.value) and "layer_types" in str(err.value)


def _save_tiny_mixtral(path) -> None:
    import transformers

    config = transformers.MixtralConfig(**TINY["MixtralForCausalLM"], dtype="float32")
    transformers.MixtralForCausalLM(config).save_pretrained(path)


@pytest.mark.parametrize("cut", ["to 64 bytes", "to half", "by its last 100 bytes"])
def test_a_truncated_safetensors_file_is_refused_in_one_line_naming_it(tmp_path, capsys, cut):
    src = tmp_path / "hf"
    _save_tiny_mixtral(src)
    weights = src / "model.safetensors"
    data = weights.read_bytes()
    kept = {"to 64 bytes": 64, "to half": len(data) // 2, "by its last 100 bytes": len(data) - 100}
    weights.write_bytes(data[: kept[cut]])
    capsys.readouterr()  # transformers' progress bar while saving
    assert moectl(["convert", str(src), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"moectl: error: {weights}: not a readable safetensors file"), err
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]


def test_a_truncated_shard_or_bin_file_is_named(tmp_path):
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(64)}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({"b": torch.zeros(64)}, tmp_path / "model-00002-of-00002.safetensors")
    index = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))
    HFWeights(tmp_path).check_files()  # whole: accepted
    shard = tmp_path / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(ConvertError, match=f"^{shard}: not a readable safetensors file"):
        HFWeights(tmp_path).check_files()

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    torch.save({"a": torch.zeros(64)}, bin_dir / "pytorch_model.bin")
    data = (bin_dir / "pytorch_model.bin").read_bytes()
    (bin_dir / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConvertError, match="pytorch_model.bin: not a readable PyTorch weights"):
        HFWeights(bin_dir)


def test_the_output_appears_only_when_the_conversion_succeeds(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ConvertError, match="refused"):
        with staged_output(out) as staging:
            (staging / "config.yaml").write_text("x")
            raise ConvertError("refused")
    assert list(tmp_path.iterdir()) == []  # neither OUT nor the partial output
    out.mkdir()  # an empty OUT is allowed, and replaced
    with staged_output(out) as staging:
        (staging / "config.yaml").write_text("x")
        assert not (out / "config.yaml").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert (out / "config.yaml").read_text() == "x"


def test_a_crashed_job_keeps_its_log_and_names_it():
    """A job that fails other than by refusing (here: a spec without its fields) is an error
    naming the log, which is kept; the traceback stays in the log."""
    import re
    import shutil

    with pytest.raises(ConvertError) as err:
        run_job({"direction": "to_hf"}, stream=False)
    found = re.fullmatch(r"the conversion job failed \(exit 1\); its log: (\S+)", str(err.value))
    assert found, str(err.value)
    log = Path(found.group(1))
    assert "KeyError: 'config'" in log.read_text()
    shutil.rmtree(log.parent.parent)


def test_deepseek_yarn_maps_to_latent_attention_fields_and_back():
    """V3's release settings (config.json rope_scaling): factor 40 over 4096 positions, mscale
    and mscale_all_dim 1, betas 32 / 1; written back as the same rope_parameters."""
    from moe_parallel.config.schema import ModelConfig

    module = ARCHITECTURES["DeepseekV3ForCausalLM"]
    section = module.model_section({**_tiny_config("DeepseekV3ForCausalLM"), "rope_scaling": YARN})
    mla = section["latent_attention"]
    assert (mla["rope_type"], mla["rotary_scaling_factor"]) == ("yarn", 40.0)
    assert (mla["original_max_position_embeddings"], mla["beta_fast"], mla["beta_slow"]) == (
        4096,
        32.0,
        1.0,
    )
    assert (mla["mscale"], mla["mscale_all_dim"]) == (1.0, 1.0)
    # The release's config.json writes it as transformers 4 did ("type", rope_theta on top).
    release = {k: v for k, v in YARN.items() if k not in ("rope_type", "rope_theta")}
    v4 = {"rope_scaling": {**release, "type": "yarn"}, "rope_theta": 10000}
    again = module.model_section({**_tiny_config("DeepseekV3ForCausalLM"), **v4})
    assert again["latent_attention"] == mla and again["rotary_base"] == 10000.0
    model = ModelConfig(**{**section, "vocab_size": 200})
    rope = module.hf_config(model, "float32")["rope_parameters"]
    assert rope == {**YARN, "beta_fast": 32.0, "beta_slow": 1.0}


@pytest.mark.parametrize(
    "name, arch, other, why",
    [
        ("deepseek_v3_tiny", "DeepseekV3ForCausalLM", "deepseek_v2", "softmax over all experts"),
        ("deepseek_v2_lite_tiny", "DeepseekV2ForCausalLM", "deepseek_v3", "sigmoid scores"),
    ],
)
def test_latent_attention_families_are_written_as_their_deepseek_version_only(
    name, arch, other, why
):
    from moe_parallel.config import load_config
    from moe_parallel.convert.cli import choose_architecture

    model = load_config(Path(__file__).parents[2] / "configs" / "tiny" / f"{name}.yaml").model
    assert choose_architecture(model, None).HF_CLASS == arch
    with pytest.raises(ConvertError, match="cannot be written as") as err:
        choose_architecture(model, "qwen2_moe")
    assert "model.attention='mla' (needs plain attention)" in str(err.value)
    with pytest.raises(ConvertError, match=why):
        choose_architecture(model, other)


@pytest.mark.parametrize(
    "arch, change, why",
    [
        (
            "DeepseekV3ForCausalLM",
            {"num_experts_per_tok": 4, "topk_group": 1},
            "HF scores a group by its best 2 experts, Megatron by its best "
            "num_experts_per_tok / topk_group = 4",
        ),
        ("DeepseekV3ForCausalLM", {"rope_interleave": False}, "^rope_interleave=False: "),
        ("DeepseekV3ForCausalLM", {"norm_topk_prob": False}, "^norm_topk_prob=False: "),
        ("DeepseekV3ForCausalLM", {"rms_norm_eps": 1e-5}, "^rms_norm_eps=1e-05: "),
        (
            "DeepseekV3ForCausalLM",
            {"rope_parameters": {**YARN, "attention_factor": 0.5}},
            "^rope_parameters.attention_factor / truncate=false: ",
        ),
        (
            "DeepseekV3ForCausalLM",
            {"rope_parameters": {**YARN, "mscale": 0.7, "mscale_all_dim": None}},
            "^rope_parameters.mscale=0.7 without mscale_all_dim: ",
        ),
        (
            "DeepseekV2ForCausalLM",
            {"rope_parameters": {**YARN, "rope_type": "linear"}},
            "^rope_type='linear': only plain RoPE",
        ),
        (
            "DeepseekV2ForCausalLM",
            {"topk_method": "group_limited_greedy", "n_group": 2, "topk_group": 1},
            "best expert, Megatron by its best num_experts_per_tok / topk_group",
        ),
        ("DeepseekV2ForCausalLM", {"num_key_value_heads": 2}, "^num_key_value_heads=2: "),
    ],
)
def test_deepseek_settings_megatron_cannot_match_are_refused_naming_the_field(arch, change, why):
    module = ARCHITECTURES[arch]
    with pytest.raises(ConvertError, match=why) as err:
        module.model_section({**_tiny_config(arch), **change})
    assert "\n" not in str(err.value)


def test_deepseek_sections_map_routing_and_latent_sizes():
    v3 = ARCHITECTURES["DeepseekV3ForCausalLM"].model_section(_tiny_config("DeepseekV3ForCausalLM"))
    assert v3["latent_attention"] == dict(
        q_lora_rank=1536, kv_lora_rank=8, qk_head_dim=4, qk_pos_emb_head_dim=2, v_head_dim=4
    )  # q_lora_rank: DeepseekV3Config's default, as transformers would build it
    moe = v3["moe"]
    assert (moe["num_groups"], moe["group_topk"], moe["routed_scaling_factor"]) == (2, 1, 2.5)
    assert moe["score_function"] == "sigmoid" and moe["expert_bias"] and not moe["pre_softmax"]
    assert (moe["shared_expert_ffn_hidden_size"], moe["first_dense_layers"]) == (8, 1)
    v2 = ARCHITECTURES["DeepseekV2ForCausalLM"].model_section(_tiny_config("DeepseekV2ForCausalLM"))
    moe = v2["moe"]
    assert moe["pre_softmax"] and moe["routed_scaling_factor"] is None and "num_groups" not in moe
    assert moe["shared_expert_ffn_hidden_size"] == 16  # DeepseekV2Config: 2 shared experts


def test_qk_norm_twins_are_written_as_their_architecture_and_only_as_it():
    from moe_parallel.config import load_config
    from moe_parallel.convert.cli import choose_architecture
    from moe_parallel.convert.core import ConvertError

    model = load_config(
        Path(__file__).parents[2] / "configs" / "tiny" / "qwen3_moe_tiny.yaml"
    ).model
    assert choose_architecture(model, None).HF_CLASS == "Qwen3MoeForCausalLM"
    with pytest.raises(ConvertError, match="QK-norm: only Qwen3-MoE and OLMoE have it"):
        choose_architecture(model, "mixtral")
    # Without QK-norm the Qwen3-MoE writer refuses, naming the field.
    plain = load_config(
        Path(__file__).parents[2] / "configs" / "tiny" / "qwen3_moe_tiny.yaml",
        ["model.qk_norm=false"],
    ).model
    with pytest.raises(
        ConvertError, match="needs model.qk_norm=true with model.qk_norm_scope=head"
    ):
        choose_architecture(plain, "qwen3_moe")
    olmoe = load_config(Path(__file__).parents[2] / "configs" / "tiny" / "olmoe_tiny.yaml").model
    assert choose_architecture(olmoe, None).HF_CLASS == "OlmoeForCausalLM"
    with pytest.raises(ConvertError, match="qk_norm_scope=head"):
        choose_architecture(olmoe, "qwen3_moe")


def test_block_fp8_weights_are_read_dequantised_block_by_block(tmp_path):
    """DeepSeek-V3's release format: an FP8 weight times the scale of its block (here 128 x 64),
    the last blocks partial (200 x 130: 2 x 3 blocks); unquantised tensors as they are; the
    scales are no weights; another quantisation is refused naming it."""
    from safetensors.torch import save_file

    from moe_parallel.convert.hf_files import DequantisedWeights, block_size

    torch.manual_seed(0)
    fp8 = (torch.randn(200, 130) * 100).to(torch.float8_e4m3fn)
    scales = torch.tensor([[0.5, 2.0, 4.0], [3.0, 0.25, 8.0]])
    norm = torch.randn(130)
    save_file(
        {"a.weight": fp8, "a.weight_scale_inv": scales, "n.weight": norm},
        str(tmp_path / "model.safetensors"),
    )
    quant = {"quant_method": "fp8", "weight_block_size": [128, 64]}
    weights = DequantisedWeights(HFWeights(tmp_path), block_size({"quantization_config": quant}))
    assert weights.names() == {"a.weight", "n.weight"}
    got = weights.get("a.weight", "ours")
    want = fp8.float()
    for i, rows in enumerate((slice(0, 128), slice(128, 200))):
        for j, cols in enumerate((slice(0, 64), slice(64, 128), slice(128, 130))):
            want[rows, cols] *= scales[i, j]
    assert got.dtype == torch.float32 and torch.equal(got, want)
    assert torch.equal(weights.get("n.weight", "ours"), norm)
    with pytest.raises(ConvertError, match="^quantization_config \\(quant_method='bitsandbytes'"):
        block_size({"quantization_config": {"quant_method": "bitsandbytes"}})


def test_deepseek_v3_config_with_fp8_quantisation_is_read():
    fp8 = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    config = {**_tiny_config("DeepseekV3ForCausalLM"), "quantization_config": fp8}
    module = ARCHITECTURES["DeepseekV3ForCausalLM"]
    assert module.model_section(config)["moe"]["num_groups"] == 2
