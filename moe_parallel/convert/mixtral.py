"""Mixtral (``MixtralForCausalLM``): every layer MoE, no shared expert, no biases.

Router: softmax over all experts, top-k, then the k weights renormalised to sum to 1, which is
Megatron's top-k over the logits followed by a softmax over the k (``pre_softmax: false``).
Experts: ``block_sparse_moe.experts.j.{w1 (gate), w3 (up), w2 (down)}``.
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
    glu_rules,
    llama_like_limits,
    routed_only_limits,
    train_within_window,
    transformers_view,
)

HF_CLASS = "MixtralForCausalLM"
MODEL_TYPE = "mixtral"
CONFIG_CLASS = "MixtralConfig"  # transformers' class: the defaults of fields config.json omits
REQUIRED = (*SIZE_FIELDS, "num_local_experts")


def model_section(hf: dict) -> dict:
    hf = transformers_view(hf, HF_CLASS, CONFIG_CLASS, REQUIRED)
    section = common_model_section(hf, HF_CLASS)
    train_within_window(section, hf)
    top_k = hf["num_experts_per_tok"]
    if top_k == 1:
        raise ConvertError(
            "num_experts_per_tok=1: Mixtral's renormalised top-1 weight is always "
            "1, which Megatron's router cannot express (it needs pre_softmax for "
            "top-1)"
        )
    section.update(
        ffn_hidden_size=hf["intermediate_size"],
        add_qkv_bias=False,
        moe=dict(
            num_experts=hf["num_local_experts"],
            top_k=top_k,
            expert_ffn_hidden_size=hf["intermediate_size"],
            layer_freq=1,
            score_function="softmax",
            pre_softmax=False,  # = HF's softmax, top-k, renormalise
            load_balancing="aux_loss",
            aux_loss_coeff=hf["router_aux_loss_coef"],
            router_dtype="fp32",
        ),
    )
    return section


def limits(model: ModelConfig) -> list[str]:
    reasons = llama_like_limits(model) + routed_only_limits(model, "Mixtral")
    if model.moe is not None and model.moe.pre_softmax:
        reasons.append("model.moe.pre_softmax=true (Mixtral renormalises the top-k weights)")
    return reasons


def hf_config(model: ModelConfig, dtype: str) -> dict:
    moe = model.moe
    config = common_hf_config(model, dtype)
    config.update(
        architectures=[HF_CLASS],
        model_type=MODEL_TYPE,
        intermediate_size=moe.expert_ffn_hidden_size,
        num_local_experts=moe.num_experts,
        num_experts_per_tok=moe.top_k,
        router_aux_loss_coef=moe.aux_loss_coeff,
        router_jitter_noise=0.0,
        sliding_window=None,
    )
    return config


def rules(model: ModelConfig) -> list[Rule]:
    out = embedding_rules(model)
    for layer in range(model.num_layers):
        out += attention_rules(model, layer)
        ours, hf = f"decoder.layers.{layer}.mlp", f"model.layers.{layer}.block_sparse_moe"
        out.append(Rule(f"{ours}.router.weight", (f"{hf}.gate.weight",)))
        for j in range(model.moe.num_experts):
            out += glu_rules(
                f"{ours}.experts.local_experts.{j}", f"{hf}.experts.{j}", "w1", "w3", "w2"
            )
    return out
