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


def _sparse_layers(hf: dict) -> list[int]:
    """HF's rule: a layer is MoE unless listed in mlp_only_layers or off the sparse step."""
    step = hf["decoder_sparse_step"]
    dense = set(hf["mlp_only_layers"] or [])
    experts = hf["num_experts"]
    return [
        int(i not in dense and experts > 0 and (i + 1) % step == 0)
        for i in range(hf["num_hidden_layers"])
    ]


def model_section(hf: dict) -> dict:
    hf = transformers_view(hf, HF_CLASS, CONFIG_CLASS, REQUIRED)
    if hf.get("use_sliding_window") or any(
        t != "full_attention" for t in hf.get("layer_types") or []
    ):
        raise ConvertError(
            "use_sliding_window=true / sliding_attention layers: only full "
            "causal attention is supported"
        )
    pattern = _sparse_layers(hf)
    if not any(pattern):
        raise ConvertError(
            "no MoE layer (num_experts, mlp_only_layers, decoder_sparse_step): "
            "a dense model is not a Qwen2-MoE conversion"
        )
    top_k = hf["num_experts_per_tok"]
    norm_topk = bool(hf["norm_topk_prob"])
    if top_k == 1 and norm_topk:
        raise ConvertError(
            "num_experts_per_tok=1 with norm_topk_prob=true: a renormalised top-1 "
            "weight is always 1, which Megatron's router cannot express"
        )
    if not hf.get("shared_expert_intermediate_size"):
        raise ConvertError(
            "shared_expert_intermediate_size is missing or 0: Qwen2-MoE always has a shared expert"
        )
    section = common_model_section(hf, HF_CLASS)
    section.update(
        ffn_hidden_size=hf["intermediate_size"],
        # transformers 4's class has no qkv_bias: its attention always has q/k/v biases
        add_qkv_bias=bool(hf.get("qkv_bias", True)),
        moe=dict(
            num_experts=hf["num_experts"],
            top_k=top_k,
            expert_ffn_hidden_size=hf["moe_intermediate_size"],
            shared_expert_ffn_hidden_size=hf["shared_expert_intermediate_size"],
            shared_expert_gate=True,
            layer_freq=1 if all(pattern) else pattern,
            score_function="softmax",
            pre_softmax=not norm_topk,
            load_balancing="aux_loss",
            aux_loss_coeff=hf["router_aux_loss_coef"],
            router_dtype="fp32",
        ),
    )
    return section


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
    pattern = model.moe_layer_pattern
    config = common_hf_config(model, dtype)
    config.update(
        architectures=[HF_CLASS],
        model_type=MODEL_TYPE,
        intermediate_size=model.ffn_hidden_size,
        moe_intermediate_size=moe.expert_ffn_hidden_size,
        shared_expert_intermediate_size=moe.shared_expert_ffn_hidden_size,
        num_experts=moe.num_experts,
        num_experts_per_tok=moe.top_k,
        norm_topk_prob=not moe.pre_softmax,
        decoder_sparse_step=1,
        mlp_only_layers=[i for i, sparse in enumerate(pattern) if not sparse],
        qkv_bias=model.add_qkv_bias,
        router_aux_loss_coef=moe.aux_loss_coeff,
        use_sliding_window=False,
        sliding_window=None,
        layer_types=["full_attention"] * model.num_layers,
    )
    return config


def rules(model: ModelConfig) -> list[Rule]:
    out = embedding_rules(model)
    for layer, sparse in enumerate(model.moe_layer_pattern):
        out += attention_rules(model, layer)
        ours, hf = f"decoder.layers.{layer}.mlp", f"model.layers.{layer}.mlp"
        if not sparse:
            out += glu_rules(ours, hf, "gate_proj", "up_proj", "down_proj")
            continue
        out.append(Rule(f"{ours}.router.weight", (f"{hf}.gate.weight",)))
        for j in range(model.moe.num_experts):
            out += glu_rules(
                f"{ours}.experts.local_experts.{j}",
                f"{hf}.experts.{j}",
                "gate_proj",
                "up_proj",
                "down_proj",
            )
        out += glu_rules(
            f"{ours}.shared_experts", f"{hf}.shared_expert", "gate_proj", "up_proj", "down_proj"
        )
        out.append(Rule(f"{ours}.shared_experts.gate_weight", (f"{hf}.shared_expert_gate.weight",)))
    return out
