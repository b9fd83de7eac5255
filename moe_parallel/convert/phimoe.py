"""PhiMoE (``PhimoeForCausalLM``): GRIN MoE's published architecture (microsoft/GRIN-MoE).

Differs from Mixtral in: LayerNorm with bias (eps is the config's ``rms_norm_eps``), biases on
q/k/v/o (``attention_bias``), a bias on the LM head (``lm_head_bias``), and SparseMixer-v2
routing (``router: sparsemixer``, mask threshold ``2 * router_jitter_noise``; deterministic top-2
in evaluation, which is what logits are compared with). Experts and router names are Mixtral's
(``block_sparse_moe.experts.j.{w1, w3, w2}``, ``block_sparse_moe.gate``).
"""

from __future__ import annotations

from ..config.schema import ModelConfig
from . import mixtral
from .core import (
    SIZE_FIELDS,
    ConvertError,
    Rule,
    common_model_section,
    glu_rules,
    require,
    train_within_window,
    transformers_view,
)

HF_CLASS = "PhimoeForCausalLM"
MODEL_TYPE = "phimoe"
CONFIG_CLASS = "PhimoeConfig"  # transformers' class: the defaults of fields config.json omits
REQUIRED = (*SIZE_FIELDS, "num_local_experts")


def model_section(hf: dict) -> dict:
    hf = transformers_view(hf, HF_CLASS, CONFIG_CLASS, REQUIRED)
    section = common_model_section(hf, HF_CLASS)
    train_within_window(section, hf)
    require(
        hf,
        "num_experts_per_tok",
        lambda v: v in (2, None),
        "SparseMixer-v2 (PhiMoE's router) routes to exactly 2 experts",
    )
    bias = bool(hf["attention_bias"])
    section.update(
        ffn_hidden_size=hf["intermediate_size"],
        normalization="LayerNorm",  # its eps is the config's rms_norm_eps (common section)
        add_qkv_bias=bias,
        attention_output_bias=bias,
        output_layer_bias=bool(hf["lm_head_bias"]),
        moe=dict(
            num_experts=hf["num_local_experts"],
            top_k=2,
            expert_ffn_hidden_size=hf["intermediate_size"],
            layer_freq=1,
            router="sparsemixer",
            sparsemixer_jitter_eps=hf["router_jitter_noise"],
            input_jitter_eps=hf.get("input_jitter_noise") or None,
            score_function="softmax",
            load_balancing="aux_loss",
            aux_loss_coeff=hf["router_aux_loss_coef"],
            router_dtype="fp32",
        ),
    )
    return section


def limits(model: ModelConfig) -> list[str]:
    reasons = []
    if model.normalization != "LayerNorm":
        reasons.append(f"model.normalization={model.normalization!r} (PhiMoE needs LayerNorm)")
    if model.activation != "swiglu" or model.add_bias_linear:
        reasons.append(
            "PhiMoE's experts are bias-free SwiGLU (model.activation=swiglu, add_bias_linear=false)"
        )
    if model.position_embedding != "rope" or model.rotary_percent != 1.0:
        reasons.append("needs full RoPE (model.position_embedding=rope, rotary_percent=1)")
    if model.add_qkv_bias != model.attention_output_bias:
        reasons.append(
            "PhiMoE has biases on all of q/k/v/o or none (model.add_qkv_bias, "
            "attention_output_bias)"
        )
    if model.attention != "standard":
        reasons.append(f"model.attention={model.attention!r} (PhiMoE has plain attention)")
    moe = model.moe
    if moe is None or moe.router != "sparsemixer" or moe.top_k != 2:
        reasons.append("PhiMoE routes with SparseMixer-v2, top-2 (model.moe.router=sparsemixer)")
    elif moe.shared_expert_ffn_hidden_size is not None or set(model.moe_layer_pattern) != {1}:
        reasons.append("PhiMoE has experts in every layer and no shared expert")
    return reasons


def hf_config(model: ModelConfig, dtype: str) -> dict:
    """Mixtral's config fields (the same expert layout) plus PhiMoE's own."""
    moe = model.moe
    config = mixtral.hf_config(model, dtype)
    config.update(
        architectures=[HF_CLASS],
        model_type=MODEL_TYPE,
        router_jitter_noise=moe.sparsemixer_jitter_eps,
        input_jitter_noise=moe.input_jitter_eps or 0.0,
        attention_bias=model.add_qkv_bias,
        lm_head_bias=model.output_layer_bias,
    )
    return config


def _norm(ours: str, hf: str) -> list[Rule]:
    return [Rule(f"{ours}.weight", (f"{hf}.weight",)), Rule(f"{ours}.bias", (f"{hf}.bias",))]


def rules(model: ModelConfig) -> list[Rule]:
    if model.tie_embeddings:
        raise ConvertError("model.tie_embeddings=true: PhiMoE's LM head is its own tensor")
    out = [
        Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab"),
        Rule("output_layer.weight", ("lm_head.weight",), "vocab"),
        *_norm("decoder.final_layernorm", "model.norm"),
    ]
    if model.output_layer_bias:
        out.append(Rule("output_layer.bias", ("lm_head.bias",), "vocab"))
    for layer in range(model.num_layers):
        ours, hf = f"decoder.layers.{layer}", f"model.layers.{layer}"
        attn = f"{hf}.self_attn"
        out += _norm(f"{ours}.input_layernorm", f"{hf}.input_layernorm")
        out += _norm(f"{ours}.pre_mlp_layernorm", f"{hf}.post_attention_layernorm")
        out.append(
            Rule(
                f"{ours}.self_attention.linear_qkv.weight",
                tuple(f"{attn}.{p}_proj.weight" for p in "qkv"),
                "qkv",
            )
        )
        out.append(Rule(f"{ours}.self_attention.linear_proj.weight", (f"{attn}.o_proj.weight",)))
        if model.add_qkv_bias:
            out.append(
                Rule(
                    f"{ours}.self_attention.linear_qkv.bias",
                    tuple(f"{attn}.{p}_proj.bias" for p in "qkv"),
                    "qkv",
                )
            )
            out.append(Rule(f"{ours}.self_attention.linear_proj.bias", (f"{attn}.o_proj.bias",)))
        moe_ours, moe_hf = f"{ours}.mlp", f"{hf}.block_sparse_moe"
        out.append(Rule(f"{moe_ours}.router.weight", (f"{moe_hf}.gate.weight",)))
        for j in range(model.moe.num_experts):
            out += glu_rules(
                f"{moe_ours}.experts.local_experts.{j}", f"{moe_hf}.experts.{j}", "w1", "w3", "w2"
            )
    return out
