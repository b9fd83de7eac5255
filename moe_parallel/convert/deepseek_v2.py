"""DeepSeek-V2 (``DeepseekV2ForCausalLM``, V2-Lite too): V3's latent attention, dense first layers
and shared experts (deepseek_v3.py), with V2's router: a softmax over all experts, the top-k
probabilities used as they are (Megatron ``pre_softmax: true``), times
``routed_scaling_factor``.

``topk_method: group_limited_greedy`` (V2's device-limited routing) scores a group by its best
expert, Megatron by its best ``top_k / group_topk``: the same rule only when ``top_k`` equals
``topk_group``; other values are refused. V2-Lite routes greedily (no groups).
"""

from __future__ import annotations

from ..config.schema import ModelConfig
from .core import ConvertError, Rule, transformers_view
from .deepseek_v3 import (
    REQUIRED,
    latent_hf_config,
    latent_limits,
    latent_model_section,
    latent_rules,
    scaling_factor,
    skipped_hf_tensor,
    skipped_parameters,
)

HF_CLASS = "DeepseekV2ForCausalLM"
MODEL_TYPE = "deepseek_v2"
CONFIG_CLASS = "DeepseekV2Config"  # transformers' class: the defaults of fields config.json omits
# Balance factor of V2's expert-level loss when config.json gives no aux_loss_alpha (V2-Lite's
# config.json: 0.001).
V2_AUX_LOSS = 1e-3

__all__ = ["REQUIRED", "skipped_hf_tensor", "skipped_parameters"]


def model_section(hf: dict) -> dict:
    hf = transformers_view(hf, HF_CLASS, CONFIG_CLASS, REQUIRED)
    method, top_k = hf["topk_method"], hf["num_experts_per_tok"]
    if method == "group_limited_greedy":
        if top_k != hf["topk_group"]:
            raise ConvertError(
                f"topk_method=group_limited_greedy with num_experts_per_tok={top_k}, "
                f"topk_group={hf['topk_group']}: HF scores a group by its best expert, Megatron "
                "by its best num_experts_per_tok / topk_group; they agree only when equal"
            )
        groups = dict(num_groups=hf["n_group"], group_topk=hf["topk_group"])
    elif method == "greedy":
        groups = {}
    else:
        raise ConvertError(
            f"topk_method={method!r}: supported are 'greedy' and 'group_limited_greedy'"
        )
    section = latent_model_section(hf, HF_CLASS)
    section["moe"].update(
        score_function="softmax",
        pre_softmax=True,  # HF: softmax over all experts, then top-k, no renormalisation
        routed_scaling_factor=scaling_factor(hf),
        load_balancing="aux_loss",
        aux_loss_coeff=hf.get("aux_loss_alpha") or V2_AUX_LOSS,
        **groups,
    )
    return section


def limits(model: ModelConfig) -> list[str]:
    reasons = latent_limits(model, "DeepSeek-V2")
    moe = model.moe
    if moe is None:
        return reasons
    if moe.score_function != "softmax" or not moe.pre_softmax:
        reasons.append(
            "DeepSeek-V2 routes on a softmax over all experts, not renormalised "
            "(model.moe.score_function=softmax, pre_softmax=true)"
        )
    if moe.num_groups is not None and moe.top_k != moe.group_topk:
        reasons.append(
            "model.moe.top_k != group_topk (DeepSeek-V2 scores a group by its best expert)"
        )
    if model.mtp_layers:
        reasons.append(f"model.mtp_layers={model.mtp_layers} (DeepSeek-V2 has no MTP module)")
    return reasons


def hf_config(model: ModelConfig, dtype: str) -> dict:
    moe = model.moe
    config = latent_hf_config(model, dtype)
    config.update(
        architectures=[HF_CLASS],
        model_type=MODEL_TYPE,
        topk_method="group_limited_greedy" if moe.num_groups else "greedy",
        n_group=moe.num_groups,
        topk_group=moe.group_topk,
        norm_topk_prob=False,
        mlp_bias=False,
    )
    return config


def rules(model: ModelConfig) -> list[Rule]:
    return latent_rules(model, router_bias=False)
