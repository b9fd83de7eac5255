"""Qwen3-MoE (``Qwen3MoeForCausalLM``): fine-grained experts in every layer (or where
``mlp_only_layers`` / ``decoder_sparse_step`` leave them), no shared expert, no attention biases,
and an RMSNorm of each query and key head before RoPE (``q_norm`` / ``k_norm``, Megatron's
``qk_layernorm``; our ``model.qk_norm``).

Router: softmax over all experts, top-k; the k weights renormalised with ``norm_topk_prob``
(Megatron ``pre_softmax: false``), else used as they are (``pre_softmax: true``), as Qwen2-MoE.
"""

from __future__ import annotations

from ..config.schema import ModelConfig
from .core import (
    SIZE_FIELDS,
    ConvertError,
    Rule,
    attention_rules,
    common_hf_config,
    common_model_section,
    embedding_rules,
    llama_like_limits,
    qk_norm_rules,
    transformers_view,
)
from .qwen2_moe import (
    full_attention_sparse_layers,
    mlp_rules,
    routed_experts_hf_fields,
    routed_experts_section,
)

HF_CLASS = "Qwen3MoeForCausalLM"
MODEL_TYPE = "qwen3_moe"
CONFIG_CLASS = "Qwen3MoeConfig"  # transformers' class: the defaults of fields config.json omits
REQUIRED = (*SIZE_FIELDS, "num_experts", "moe_intermediate_size")


# The Hub's config.json says num_experts; transformers 5 writes (and its to_dict gives) the same
# field as num_local_experts (Qwen3MoeConfig.attribute_map).
EXPERTS_ALIAS = "num_local_experts"


def model_section(hf: dict) -> dict:
    if hf.get("num_experts") is None and hf.get(EXPERTS_ALIAS) is not None:
        hf = {**hf, "num_experts": hf[EXPERTS_ALIAS]}
    hf = transformers_view(hf, HF_CLASS, CONFIG_CLASS, REQUIRED)
    hf["num_experts"] = hf.get(EXPERTS_ALIAS, hf.get("num_experts"))
    if hf.get("attention_bias"):
        raise ConvertError(
            "attention_bias=true: biases on q/k/v and o are not supported for Qwen3-MoE"
        )
    pattern = full_attention_sparse_layers(hf, "Qwen3-MoE")
    section = common_model_section(hf, HF_CLASS)
    section.update(
        ffn_hidden_size=hf["intermediate_size"],
        add_qkv_bias=False,
        qk_norm=True,
        moe=routed_experts_section(hf, pattern),
    )
    return section


def limits(model: ModelConfig) -> list[str]:
    reasons = llama_like_limits(model, qk_norm=True)
    if not model.qk_norm or model.qk_norm_scope != "head":
        reasons.append(
            "needs model.qk_norm=true with model.qk_norm_scope=head (Qwen3-MoE normalises each "
            "query and key head)"
        )
    if model.add_qkv_bias:
        reasons.append("model.add_qkv_bias=true (Qwen3-MoE has no attention biases)")
    if model.moe is not None and model.moe.shared_expert_ffn_hidden_size is not None:
        reasons.append(
            "model.moe.shared_expert_ffn_hidden_size is set (Qwen3-MoE has no shared expert)"
        )
    return reasons


def hf_config(model: ModelConfig, dtype: str) -> dict:
    config = common_hf_config(model, dtype)
    config.update(
        architectures=[HF_CLASS],
        model_type=MODEL_TYPE,
        **routed_experts_hf_fields(model),
        attention_bias=False,
    )
    return config


def rules(model: ModelConfig) -> list[Rule]:
    out = embedding_rules(model)
    for layer, sparse in enumerate(model.moe_layer_pattern):
        out += attention_rules(model, layer) + qk_norm_rules(layer)
        out += mlp_rules(model, layer, bool(sparse))
    return out
