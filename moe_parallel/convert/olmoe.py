"""OLMoE (``OlmoeForCausalLM``): every layer MoE, no shared expert, no attention biases, and a
QK-norm over the whole query and key projections (``q_norm`` over hidden_size, ``k_norm`` over
the key-value heads; our ``model.qk_norm_scope: projection``, model/norm.py).

Router: softmax over all experts, top-k, weights renormalised only with ``norm_topk_prob``
(OLMoE-1B-7B: not), as Qwen2-MoE's.
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
    routed_only_limits,
    transformers_view,
)
from .qwen2_moe import mlp_rules, routed_experts_section

HF_CLASS = "OlmoeForCausalLM"
MODEL_TYPE = "olmoe"
CONFIG_CLASS = "OlmoeConfig"  # transformers' class: the defaults of fields config.json omits
REQUIRED = (*SIZE_FIELDS, "num_experts")


def model_section(hf: dict) -> dict:
    hf = transformers_view(hf, HF_CLASS, CONFIG_CLASS, REQUIRED)
    if hf.get("clip_qkv") is not None:
        raise ConvertError(f"clip_qkv={hf['clip_qkv']}: clipping q/k/v is not supported")
    if hf.get("attention_bias"):
        raise ConvertError("attention_bias=true: biases on q/k/v and o are not supported for OLMoE")
    section = common_model_section(hf, HF_CLASS)
    moe = routed_experts_section(
        {**hf, "moe_intermediate_size": hf["intermediate_size"]}, [1] * hf["num_hidden_layers"]
    )
    section.update(
        ffn_hidden_size=hf["intermediate_size"],
        add_qkv_bias=False,
        qk_norm=True,
        qk_norm_scope="projection",
        moe=moe,
    )
    return section


def limits(model: ModelConfig) -> list[str]:
    reasons = llama_like_limits(model, qk_norm=True)
    if not model.qk_norm or model.qk_norm_scope != "projection":
        reasons.append(
            "needs model.qk_norm=true with model.qk_norm_scope=projection (OLMoE normalises "
            "the whole query and key projections)"
        )
    return reasons + routed_only_limits(model, "OLMoE")


def hf_config(model: ModelConfig, dtype: str) -> dict:
    moe = model.moe
    config = common_hf_config(model, dtype)
    config.update(
        architectures=[HF_CLASS],
        model_type=MODEL_TYPE,
        intermediate_size=moe.expert_ffn_hidden_size,
        num_experts=moe.num_experts,
        num_experts_per_tok=moe.top_k,
        norm_topk_prob=not moe.pre_softmax,
        router_aux_loss_coef=moe.aux_loss_coeff,
        attention_bias=False,
        clip_qkv=None,
    )
    return config


def rules(model: ModelConfig) -> list[Rule]:
    out = embedding_rules(model)
    for layer in range(model.num_layers):
        out += attention_rules(model, layer) + qk_norm_rules(layer) + mlp_rules(model, layer, True)
    return out
