"""Qwen2-MoE (``Qwen2MoeForCausalLM``): q/k/v biases, a shared expert behind a sigmoid gate,
and dense layers where ``mlp_only_layers`` / ``decoder_sparse_step`` say so.

Router: softmax over all experts, top-k; the k weights are renormalised only with
``norm_topk_prob`` (Megatron ``pre_softmax: false``), else used as they are (``pre_softmax:
true``). Shared expert: ``sigmoid(shared_expert_gate(x)) * shared_expert(x)`` is Megatron's
``moe_shared_expert_gate`` (our ``model.moe.shared_expert_gate``).
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
    transformers_view,
)

HF_CLASS = "Qwen2MoeForCausalLM"
MODEL_TYPE = "qwen2_moe"
CONFIG_CLASS = "Qwen2MoeConfig"  # transformers' class: the defaults of fields config.json omits
REQUIRED = (
    *SIZE_FIELDS,
    "num_experts",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
)


def sparse_layers(hf: dict) -> list[int]:
    """HF's rule (Qwen2-MoE and Qwen3-MoE): a layer is MoE unless listed in mlp_only_layers or
    off the sparse step."""
    step = hf["decoder_sparse_step"]
    dense = set(hf["mlp_only_layers"] or [])
    experts = hf["num_experts"]
    return [
        int(i not in dense and experts > 0 and (i + 1) % step == 0)
        for i in range(hf["num_hidden_layers"])
    ]


def full_attention_sparse_layers(hf: dict, family: str) -> list[int]:
    """``sparse_layers`` of a Qwen-MoE config, refusing a sliding window (only full causal
    attention is converted) and a model without any MoE layer."""
    if hf.get("use_sliding_window") or any(
        t != "full_attention" for t in hf.get("layer_types") or []
    ):
        raise ConvertError(
            "use_sliding_window=true / sliding_attention layers: only full "
            "causal attention is supported"
        )
    pattern = sparse_layers(hf)
    if not any(pattern):
        raise ConvertError(
            "no MoE layer (num_experts, mlp_only_layers, decoder_sparse_step): "
            f"a dense model is not a {family} conversion"
        )
    return pattern


def model_section(hf: dict) -> dict:
    hf = transformers_view(hf, HF_CLASS, CONFIG_CLASS, REQUIRED)
    pattern = full_attention_sparse_layers(hf, "Qwen2-MoE")
    if not hf.get("shared_expert_intermediate_size"):
        raise ConvertError(
            "shared_expert_intermediate_size is missing or 0: Qwen2-MoE always has a shared expert"
        )
    section = common_model_section(hf, HF_CLASS)
    moe = routed_experts_section(hf, pattern)
    moe.update(
        shared_expert_ffn_hidden_size=hf["shared_expert_intermediate_size"],
        shared_expert_gate=True,
    )
    section.update(
        ffn_hidden_size=hf["intermediate_size"],
        # transformers 4's class has no qkv_bias: its attention always has q/k/v biases
        add_qkv_bias=bool(hf.get("qkv_bias", True)),
        moe=moe,
    )
    return section


def routed_experts_section(hf: dict, pattern: list[int]) -> dict:
    """``model.moe`` of a Qwen-MoE config (Qwen2-MoE's and Qwen3-MoE's routing), without the
    shared expert."""
    top_k = hf["num_experts_per_tok"]
    norm_topk = bool(hf["norm_topk_prob"])
    if top_k == 1 and norm_topk:
        raise ConvertError(
            "num_experts_per_tok=1 with norm_topk_prob=true: a renormalised top-1 "
            "weight is always 1, which Megatron's router cannot express"
        )
    return dict(
        num_experts=hf["num_experts"],
        top_k=top_k,
        expert_ffn_hidden_size=hf["moe_intermediate_size"],
        layer_freq=1 if all(pattern) else pattern,
        score_function="softmax",
        pre_softmax=not norm_topk,
        load_balancing="aux_loss",
        aux_loss_coeff=hf["router_aux_loss_coef"],
        router_dtype="fp32",
    )


def limits(model: ModelConfig) -> list[str]:
    reasons = llama_like_limits(model)
    moe = model.moe
    if moe is not None:
        if moe.shared_expert_ffn_hidden_size is None or not moe.shared_expert_gate:
            reasons.append(
                "Qwen2-MoE needs a shared expert with a sigmoid gate "
                "(model.moe.shared_expert_ffn_hidden_size, shared_expert_gate=true)"
            )
    return reasons


def hf_config(model: ModelConfig, dtype: str) -> dict:
    moe = model.moe
    config = common_hf_config(model, dtype)
    config.update(
        architectures=[HF_CLASS],
        model_type=MODEL_TYPE,
        **routed_experts_hf_fields(model),
        shared_expert_intermediate_size=moe.shared_expert_ffn_hidden_size,
        qkv_bias=model.add_qkv_bias,
        layer_types=["full_attention"] * model.num_layers,
    )
    return config


def routed_experts_hf_fields(model: ModelConfig) -> dict:
    """config.json fields of a Qwen-MoE model's layers and routed experts."""
    moe, pattern = model.moe, model.moe_layer_pattern
    return dict(
        intermediate_size=model.ffn_hidden_size,
        moe_intermediate_size=moe.expert_ffn_hidden_size,
        num_experts=moe.num_experts,
        num_experts_per_tok=moe.top_k,
        norm_topk_prob=not moe.pre_softmax,
        decoder_sparse_step=1,
        mlp_only_layers=[i for i, sparse in enumerate(pattern) if not sparse],
        router_aux_loss_coef=moe.aux_loss_coeff,
        use_sliding_window=False,
        sliding_window=None,
    )


def mlp_rules(model: ModelConfig, layer: int, sparse: bool) -> list[Rule]:
    """A Qwen-MoE layer's dense FFN, or its router and routed experts."""
    ours, hf = f"decoder.layers.{layer}.mlp", f"model.layers.{layer}.mlp"
    if not sparse:
        return glu_rules(ours, hf, "gate_proj", "up_proj", "down_proj")
    out = [Rule(f"{ours}.router.weight", (f"{hf}.gate.weight",))]
    for j in range(model.moe.num_experts):
        out += glu_rules(
            f"{ours}.experts.local_experts.{j}",
            f"{hf}.experts.{j}",
            "gate_proj",
            "up_proj",
            "down_proj",
        )
    return out


def rules(model: ModelConfig) -> list[Rule]:
    out = embedding_rules(model)
    for layer, sparse in enumerate(model.moe_layer_pattern):
        out += attention_rules(model, layer) + mlp_rules(model, layer, bool(sparse))
        if not sparse:
            continue
        ours, hf = f"decoder.layers.{layer}.mlp", f"model.layers.{layer}.mlp"
        out += glu_rules(
            f"{ours}.shared_experts", f"{hf}.shared_expert", "gate_proj", "up_proj", "down_proj"
        )
        out.append(Rule(f"{ours}.shared_experts.gate_weight", (f"{hf}.shared_expert_gate.weight",)))
    return out
