"""DeepSeek-V3 (``DeepseekV3ForCausalLM``), and the parts DeepSeek-V2 shares with it
(deepseek_v2.py): multi-head latent attention, dense first layers, then routed experts beside
shared experts.

Attention (our ``model.attention: mla``, Megatron's MLA): the HF projections map one to one,
``q_a_proj`` / ``q_a_layernorm`` / ``q_b_proj`` (or ``q_proj`` without a query latent) and
``kv_a_proj_with_mqa`` / ``kv_a_layernorm`` / ``kv_b_proj`` to ``linear_q_down_proj`` /
``q_layernorm`` / ``linear_q_up_proj`` (``linear_q_proj``) and ``linear_kv_down_proj`` /
``kv_layernorm`` / ``linear_kv_up_proj``, with the same per-head layouts (``[nope, rope]`` per
query head; ``[kv latent, shared rope key]``; ``[k nope, v]`` per head). RoPE: DeepSeek's weights
hold each rotated pair side by side, ``(x0, x1), (x2, x3), ...`` (V3's ``rope_interleave: true``,
V2's complex rotation); Megatron's MLA reads its RoPE part the same way (it de-interleaves before
rotating, megatron/core/models/common/embeddings/rope_utils.py), so no column moves.

Routing (V3): sigmoid scores plus ``e_score_correction_bias`` (Megatron's expert bias, a router
buffer) choose the experts, among the ``topk_group`` best of ``n_group`` groups; the chosen raw
scores are renormalised and times ``routed_scaling_factor``. HF scores a group by its best 2
experts, Megatron by its best ``top_k / group_topk``: the same rule only when that is 2 (V3:
8 / 4), so other values are refused.
"""

from __future__ import annotations

from ..config.schema import ModelConfig
from .core import (
    SIZE_FIELDS,
    ConvertError,
    Rule,
    common_hf_config,
    common_model_section,
    decoder_limits,
    embedding_rules,
    glu_rules,
    require,
    transformers_view,
)
from .qwen2_moe import mlp_rules

HF_CLASS = "DeepseekV3ForCausalLM"
MODEL_TYPE = "deepseek_v3"
CONFIG_CLASS = "DeepseekV3Config"  # transformers' class: the defaults of fields config.json omits
REQUIRED = (
    *SIZE_FIELDS,
    "n_routed_experts",
    "moe_intermediate_size",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
)
# DeepSeek's query and key-value latent norms take no epsilon from the config (transformers'
# DeepseekV2/V3RMSNorm default); ours use model.norm_epsilon for every norm.
LATENT_NORM_EPS = 1e-6
# HF scores a group of experts by the sum of its best 2 (DeepseekV3TopkRouter).
HF_GROUP_SCORE_EXPERTS = 2
# Balance factor of V3's sequence-wise loss (arXiv 2412.19437 section 4.2), when config.json
# gives no aux_loss_alpha (transformers' class has none).
V3_SEQ_AUX_LOSS = 1e-4


def model_section(hf: dict) -> dict:
    hf = transformers_view(hf, HF_CLASS, CONFIG_CLASS, REQUIRED)
    require(
        hf,
        "rope_interleave",
        lambda v: v is True,
        "only interleaved RoPE weights (rope_interleave=true, DeepSeek's own layout) are supported",
    )
    require(
        hf,
        "norm_topk_prob",
        lambda v: v is True,
        "Megatron renormalises the chosen sigmoid scores; norm_topk_prob must be true",
    )
    top_k, groups, chosen = hf["num_experts_per_tok"], hf["n_group"], hf["topk_group"]
    if top_k == 1:
        raise ConvertError(
            "num_experts_per_tok=1: HF renormalises the single sigmoid score to 1, Megatron "
            "keeps it; only top-k above 1 is supported"
        )
    if groups != 1 and top_k != HF_GROUP_SCORE_EXPERTS * chosen:
        raise ConvertError(
            f"num_experts_per_tok={top_k} with topk_group={chosen} (n_group={groups}): HF scores "
            f"a group by its best {HF_GROUP_SCORE_EXPERTS} experts, Megatron by its best "
            f"num_experts_per_tok / topk_group = {top_k / chosen:g}; they agree only when that "
            f"is {HF_GROUP_SCORE_EXPERTS} (or with n_group=1)"
        )
    section = latent_model_section(hf, HF_CLASS)
    section["moe"].update(
        score_function="sigmoid",
        pre_softmax=False,
        expert_bias=True,
        routed_scaling_factor=scaling_factor(hf),
        num_groups=groups if groups != 1 else None,
        group_topk=chosen if groups != 1 else None,
        load_balancing="seq_aux_loss",
        aux_loss_coeff=hf.get("aux_loss_alpha") or V3_SEQ_AUX_LOSS,
    )
    return section


def scaling_factor(hf: dict) -> float | None:
    factor = float(hf["routed_scaling_factor"])
    return None if factor == 1.0 else factor


def latent_model_section(hf: dict, arch: str) -> dict:
    """``model.*`` of a DeepSeek-V2/V3 config: MLA, dense first layers, routed and shared
    experts (the router's scores are each version's); the MTP module is not converted."""
    heads = hf["num_attention_heads"]
    require(
        hf,
        "num_key_value_heads",
        lambda v: v == heads,
        f"every latent-attention head has its own key and value; transformers repeats them "
        f"num_attention_heads / num_key_value_heads times, so it must be {heads}",
    )
    require(hf, "attention_bias", lambda v: not v, "biases on q/k/v and o are not supported")
    require(hf, "mlp_bias", lambda v: not v, "MLP biases are not supported")
    require(
        hf,
        "rms_norm_eps",
        lambda v: v == LATENT_NORM_EPS,
        f"DeepSeek's latent norms always use {LATENT_NORM_EPS} and ours use the one epsilon, "
        f"so only {LATENT_NORM_EPS} is supported",
    )
    require(
        hf,
        "n_shared_experts",
        lambda v: isinstance(v, int) and v >= 1,
        "DeepSeek-V2/V3 have shared experts (an integer from 1)",
    )
    mtp = hf.get("num_nextn_predict_layers") or 0
    if mtp:
        print(
            f"{arch}: num_nextn_predict_layers={mtp}: the multi-token prediction module "
            f"(model.layers.{hf['num_hidden_layers']}.* and after) is not converted; "
            "model.mtp_layers=0",
            flush=True,
        )
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    yarn = rope.get("rope_type") == "yarn"
    plain = {**hf, "rope_parameters": {**rope, "rope_type": "default"}} if yarn else hf
    section = common_model_section(plain, arch)  # refuses RoPE scalings other than YaRN
    del section["num_query_groups"], section["kv_channels"]  # MLA sets its own
    section.update(
        ffn_hidden_size=hf["intermediate_size"],
        add_qkv_bias=False,
        attention="mla",
        latent_attention=dict(
            q_lora_rank=hf.get("q_lora_rank"),
            kv_lora_rank=hf["kv_lora_rank"],
            qk_head_dim=hf["qk_nope_head_dim"],
            qk_pos_emb_head_dim=hf["qk_rope_head_dim"],
            v_head_dim=hf["v_head_dim"],
            **(yarn_fields(rope, hf["max_position_embeddings"]) if yarn else {}),
        ),
        moe=dict(
            num_experts=hf["n_routed_experts"],
            top_k=hf["num_experts_per_tok"],
            expert_ffn_hidden_size=hf["moe_intermediate_size"],
            shared_expert_ffn_hidden_size=hf["moe_intermediate_size"] * hf["n_shared_experts"],
            first_dense_layers=hf["first_k_dense_replace"],
            router_dtype="fp32",
        ),
    )
    return section


# HF's YaRN defaults (transformers modeling_rope_utils._compute_yarn_parameters), which Megatron's
# YarnRotaryEmbedding shares.
YARN_BETA_FAST, YARN_BETA_SLOW = 32.0, 1.0


def yarn_fields(rope: dict, max_positions: int) -> dict:
    """``model.latent_attention``'s YaRN fields from HF's ``rope_parameters`` (rope_type yarn),
    refusing the settings Megatron computes otherwise: an explicit ``attention_factor``,
    ``truncate: false``, and ``mscale`` without ``mscale_all_dim`` (HF then ignores mscale,
    Megatron does not)."""
    if rope.get("attention_factor") is not None or rope.get("truncate") is False:
        raise ConvertError(
            "rope_parameters.attention_factor / truncate=false: Megatron's YaRN derives the "
            "attention factor from factor, mscale and mscale_all_dim and rounds the correction "
            "range; leave them out"
        )
    mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
    if mscale not in (None, 1, 1.0) and not mscale_all_dim:
        raise ConvertError(
            f"rope_parameters.mscale={mscale} without mscale_all_dim: transformers then "
            "ignores mscale and Megatron does not"
        )
    original = rope.get("original_max_position_embeddings")
    if original is None:
        raise ConvertError("rope_parameters.original_max_position_embeddings is missing (YaRN)")
    factor = rope.get("factor") or max_positions / original  # transformers' rule
    return dict(
        rope_type="yarn",
        rotary_scaling_factor=float(factor),
        original_max_position_embeddings=int(original),
        beta_fast=float(rope.get("beta_fast") or YARN_BETA_FAST),
        beta_slow=float(rope.get("beta_slow") or YARN_BETA_SLOW),
        mscale=float(mscale or 1.0),
        mscale_all_dim=float(mscale_all_dim or 0.0),
    )


def latent_limits(model: ModelConfig, family: str) -> list[str]:
    """Why ``model`` is not DeepSeek-shaped: MLA with plain RoPE, dense first layers then
    experts in every layer, ungated shared experts a whole number of experts wide."""
    reasons = decoder_limits(model)
    if model.attention != "mla":
        reasons.append(f"model.attention={model.attention!r} ({family} needs mla)")
    if model.add_qkv_bias or model.qk_norm:
        reasons.append(f"model.add_qkv_bias / qk_norm ({family} has neither)")
    if model.norm_epsilon != LATENT_NORM_EPS:
        reasons.append(
            f"model.norm_epsilon={model.norm_epsilon} ({family}'s latent norms use "
            f"{LATENT_NORM_EPS})"
        )
    moe = model.moe
    if moe is None:
        return reasons
    dense = moe.first_dense_layers
    if model.moe_layer_pattern != [0] * dense + [1] * (model.num_layers - dense):
        reasons.append(
            f"model.moe.layer_freq: {family} has experts in every layer after the "
            "first_dense_layers"
        )
    shared = moe.shared_expert_ffn_hidden_size
    if shared is None or shared % moe.expert_ffn_hidden_size or moe.shared_expert_gate:
        reasons.append(
            f"{family} needs ungated shared experts a whole number of experts wide "
            "(model.moe.shared_expert_ffn_hidden_size, shared_expert_gate=false)"
        )
    return reasons


def limits(model: ModelConfig) -> list[str]:
    reasons = latent_limits(model, "DeepSeek-V3")
    moe = model.moe
    if moe is None:
        return reasons
    if moe.score_function != "sigmoid" or not moe.expert_bias or moe.pre_softmax:
        reasons.append(
            "DeepSeek-V3 routes on sigmoid scores with the expert bias, renormalised "
            "(model.moe.score_function=sigmoid, expert_bias=true, pre_softmax=false)"
        )
    if moe.top_k == 1:
        reasons.append("model.moe.top_k=1 (DeepSeek-V3 renormalises the chosen scores)")
    if moe.num_groups is not None and moe.top_k != HF_GROUP_SCORE_EXPERTS * moe.group_topk:
        reasons.append(
            f"model.moe.top_k / group_topk = {moe.top_k / moe.group_topk:g} (DeepSeek-V3 "
            f"scores a group by its best {HF_GROUP_SCORE_EXPERTS})"
        )
    return reasons


def latent_hf_config(model: ModelConfig, dtype: str) -> dict:
    """config.json fields DeepSeek-V2 and V3 share."""
    moe, mla = model.moe, model.latent_attention
    config = common_hf_config(model, dtype)
    config.update(
        num_key_value_heads=model.num_attention_heads,
        head_dim=mla.qk_pos_emb_head_dim,  # what transformers' classes set it to
        intermediate_size=model.ffn_hidden_size,
        moe_intermediate_size=moe.expert_ffn_hidden_size,
        n_routed_experts=moe.num_experts,
        n_shared_experts=moe.shared_expert_ffn_hidden_size // moe.expert_ffn_hidden_size,
        num_experts_per_tok=moe.top_k,
        first_k_dense_replace=moe.first_dense_layers,
        q_lora_rank=mla.q_lora_rank,
        kv_lora_rank=mla.kv_lora_rank,
        qk_nope_head_dim=mla.qk_head_dim,
        qk_rope_head_dim=mla.qk_pos_emb_head_dim,
        v_head_dim=mla.v_head_dim,
        routed_scaling_factor=moe.routed_scaling_factor or 1.0,
        attention_bias=False,
        aux_loss_alpha=moe.aux_loss_coeff,
    )
    if mla.rope_type == "yarn":
        config["rope_parameters"] = dict(
            config["rope_parameters"],
            rope_type="yarn",
            factor=mla.rotary_scaling_factor,
            original_max_position_embeddings=mla.original_max_position_embeddings,
            beta_fast=mla.beta_fast or YARN_BETA_FAST,
            beta_slow=mla.beta_slow or YARN_BETA_SLOW,
            mscale=mla.mscale or 1.0,
            mscale_all_dim=mla.mscale_all_dim or 0.0,
        )
    return config


def hf_config(model: ModelConfig, dtype: str) -> dict:
    moe = model.moe
    config = latent_hf_config(model, dtype)
    config.update(
        architectures=[HF_CLASS],
        model_type=MODEL_TYPE,
        n_group=moe.num_groups or 1,
        topk_group=moe.group_topk or 1,
        norm_topk_prob=True,
        rope_interleave=True,
        num_nextn_predict_layers=0,
    )
    return config


def latent_attention_rules(model: ModelConfig, layer: int) -> list[Rule]:
    ours, hf = f"decoder.layers.{layer}", f"model.layers.{layer}"
    attn, self_attn = f"{ours}.self_attention", f"{hf}.self_attn"
    pairs = [
        ("input_layernorm", None, "input_layernorm"),
        ("pre_mlp_layernorm", None, "post_attention_layernorm"),
        (None, "linear_proj", "o_proj"),
        (None, "linear_kv_down_proj", "kv_a_proj_with_mqa"),
        (None, "kv_layernorm", "kv_a_layernorm"),
        (None, "linear_kv_up_proj", "kv_b_proj"),
    ]
    if model.latent_attention.q_lora_rank is None:
        pairs.append((None, "linear_q_proj", "q_proj"))
    else:
        pairs += [
            (None, "linear_q_down_proj", "q_a_proj"),
            (None, "q_layernorm", "q_a_layernorm"),
            (None, "linear_q_up_proj", "q_b_proj"),
        ]
    return [
        Rule(f"{ours}.{norm}.weight", (f"{hf}.{hf_name}.weight",))
        if norm
        else Rule(f"{attn}.{proj}.weight", (f"{self_attn}.{hf_name}.weight",))
        for norm, proj, hf_name in pairs
    ]


def latent_rules(model: ModelConfig, router_bias: bool) -> list[Rule]:
    """Every layer of a DeepSeek-V2/V3 model; ``router_bias``: V3's expert bias."""
    out = embedding_rules(model)
    for layer, sparse in enumerate(model.moe_layer_pattern):
        out += latent_attention_rules(model, layer) + mlp_rules(model, layer, bool(sparse))
        if not sparse:
            continue
        ours, hf = f"decoder.layers.{layer}.mlp", f"model.layers.{layer}.mlp"
        out += glu_rules(
            f"{ours}.shared_experts", f"{hf}.shared_experts", "gate_proj", "up_proj", "down_proj"
        )
        if router_bias:
            out.append(Rule(f"{ours}.router.expert_bias", (f"{hf}.gate.e_score_correction_bias",)))
    return out


def rules(model: ModelConfig) -> list[Rule]:
    return latent_rules(model, router_bias=True)


def skipped_hf_tensor(name: str, model: ModelConfig) -> bool:
    """The multi-token prediction module's tensors (V3: ``model.layers.61.*``), not converted."""
    parts = name.split(".")
    return parts[:2] == ["model", "layers"] and int(parts[2]) >= model.num_layers


def skipped_parameters(model: ModelConfig) -> tuple[str, ...]:
    """Our parameters (prefixes) that have no place in the HF model: the MTP module."""
    return ("mtp.",) if model.mtp_layers else ()
