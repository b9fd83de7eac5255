"""What every architecture shares: name rules between Hugging Face and Megatron tensors, the
fused layouts, and the decoder parts common to Llama-style models.

Names on the Megatron side are the parameter names of a 1-rank ``GPTModel`` built with the local
spec (``decoder.layers.3.self_attention.linear_qkv.weight``); a checkpoint saved from that model
reshards to any layout on load. Names on the HF side are those of the checkpoints on the Hub
(``model.layers.3.self_attn.q_proj.weight``; per-expert tensors, as ``save_pretrained`` writes).

A :class:`Rule` ties one Megatron parameter to the HF tensors it is made of, with a ``kind``:

- ``copy``: the same tensor.
- ``qkv``: Megatron's ``linear_qkv`` holds q, k and v interleaved per query group:
  ``[q heads of group 0, k_0, v_0, q heads of group 1, k_1, v_1, ...]`` (weights and biases).
- ``glu``: a SwiGLU ``linear_fc1`` holds ``[gate; up]`` stacked on the output dimension.
- ``vocab``: embedding / output rows; Megatron pads the vocabulary to a multiple of 128 (x TP);
  the padded rows are zero going in (no input id reaches them, and the model masks their logits
  out of the softmax: model/padded_vocab.py) and are dropped going out.

Shapes: V vocabulary, Vp padded vocabulary, H hidden, n heads, g query groups, d head dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..config.schema import ModelConfig


class ConvertError(ValueError):
    """A checkpoint that cannot be converted; the message names the tensor or the setting."""


@dataclass(frozen=True)
class Rule:
    megatron: str
    hf: tuple[str, ...]
    kind: str = "copy"  # copy | qkv | glu | vocab


def to_megatron(
    rule: Rule, values: list[torch.Tensor], target_shape: tuple[int, ...], model: ModelConfig
) -> torch.Tensor:
    """The Megatron tensor of ``rule`` from its HF tensors (shapes checked, naming the tensor)."""
    expected = hf_shapes(rule, target_shape, model)
    for name, value in zip(rule.hf, values):
        if tuple(value.shape) != expected[name]:
            raise ConvertError(
                f"{name} has shape {tuple(value.shape)}, expected {expected[name]} "
                f"for {rule.megatron} (check the config's sizes)"
            )
    if rule.kind == "copy":
        return values[0]
    if rule.kind == "glu":
        return torch.cat(values, dim=0)
    if rule.kind == "qkv":
        return _fuse_qkv(*values, model)
    if rule.kind == "vocab":
        padded = values[0].new_zeros(target_shape)
        padded[: values[0].shape[0]] = values[0]
        return padded
    raise ConvertError(f"unknown rule kind {rule.kind!r} for {rule.megatron}")


def to_hf(
    rule: Rule, value: torch.Tensor, model: ModelConfig, vocab: int
) -> dict[str, torch.Tensor]:
    """The HF tensors of ``rule`` from the Megatron tensor (``vocab``: unpadded size)."""
    if rule.kind == "copy":
        parts = [value]
    elif rule.kind == "glu":
        parts = list(value.chunk(2, dim=0))
    elif rule.kind == "qkv":
        parts = _split_qkv(value, model)
    elif rule.kind == "vocab":
        parts = [value[:vocab]]
    else:
        raise ConvertError(f"unknown rule kind {rule.kind!r} for {rule.megatron}")
    return {name: part.contiguous() for name, part in zip(rule.hf, parts)}


def hf_shapes(rule: Rule, target_shape: tuple[int, ...], model: ModelConfig) -> dict[str, tuple]:
    """The shapes the HF tensors of ``rule`` must have, given the Megatron parameter's shape."""
    meta = torch.empty(target_shape, device="meta")
    vocab = model.vocab_size or target_shape[0]
    return {k: tuple(v.shape) for k, v in to_hf(rule, meta, model, vocab).items()}


def _heads(model: ModelConfig) -> tuple[int, int, int]:
    n = model.num_attention_heads
    g = model.num_query_groups or n
    d = model.kv_channels or model.hidden_size // n
    return n, g, d


def _fuse_qkv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, model: ModelConfig
) -> torch.Tensor:
    n, g, d = _heads(model)
    rest = q.shape[1:]  # (H,) for weights, () for biases
    q_g = q.reshape(g, n // g * d, *rest)
    k_g = k.reshape(g, d, *rest)
    v_g = v.reshape(g, d, *rest)
    return torch.cat([q_g, k_g, v_g], dim=1).reshape((n + 2 * g) * d, *rest)


def _split_qkv(qkv: torch.Tensor, model: ModelConfig) -> list[torch.Tensor]:
    n, g, d = _heads(model)
    rest = qkv.shape[1:]
    grouped = qkv.reshape(g, (n // g + 2) * d, *rest)
    q, k, v = grouped.split([n // g * d, d, d], dim=1)
    return [q.reshape(n * d, *rest), k.reshape(g * d, *rest), v.reshape(g * d, *rest)]


# --- Llama-style parts (embeddings, attention, norms) shared by Mixtral and Qwen2-MoE ----------


def embedding_rules(model: ModelConfig) -> list[Rule]:
    rules = [
        Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab"),
        Rule("decoder.final_layernorm.weight", ("model.norm.weight",)),
    ]
    if not model.tie_embeddings:
        rules.append(Rule("output_layer.weight", ("lm_head.weight",), "vocab"))
    return rules


def attention_rules(model: ModelConfig, layer: int) -> list[Rule]:
    ours, hf = f"decoder.layers.{layer}", f"model.layers.{layer}"
    qkv = tuple(f"{hf}.self_attn.{p}_proj.weight" for p in "qkv")
    rules = [
        Rule(f"{ours}.input_layernorm.weight", (f"{hf}.input_layernorm.weight",)),
        Rule(f"{ours}.self_attention.linear_qkv.weight", qkv, "qkv"),
        Rule(f"{ours}.self_attention.linear_proj.weight", (f"{hf}.self_attn.o_proj.weight",)),
        Rule(f"{ours}.pre_mlp_layernorm.weight", (f"{hf}.post_attention_layernorm.weight",)),
    ]
    if model.add_qkv_bias:
        biases = tuple(f"{hf}.self_attn.{p}_proj.bias" for p in "qkv")
        rules.append(Rule(f"{ours}.self_attention.linear_qkv.bias", biases, "qkv"))
    return rules


def qk_norm_rules(layer: int) -> list[Rule]:
    """Query and key norms (Qwen3-MoE per head, OLMoE per projection): q_norm / k_norm."""
    ours, hf = f"decoder.layers.{layer}.self_attention", f"model.layers.{layer}.self_attn"
    return [
        Rule(f"{ours}.q_layernorm.weight", (f"{hf}.q_norm.weight",)),
        Rule(f"{ours}.k_layernorm.weight", (f"{hf}.k_norm.weight",)),
    ]


def routed_only_limits(model: ModelConfig, family: str) -> list[str]:
    """Why ``model`` is not MoE in every layer without attention biases or a shared expert, as
    Mixtral and OLMoE are."""
    reasons = []
    if model.add_qkv_bias:
        reasons.append(f"model.add_qkv_bias=true ({family} has no attention biases)")
    if model.moe is not None:
        if model.moe.shared_expert_ffn_hidden_size is not None:
            reasons.append(
                f"model.moe.shared_expert_ffn_hidden_size is set ({family} has no shared expert)"
            )
        if set(model.moe_layer_pattern) != {1}:
            reasons.append(f"model.moe.layer_freq: {family} has experts in every layer")
    return reasons


def glu_rules(ours: str, hf: str, gate: str, up: str, down: str) -> list[Rule]:
    """A SwiGLU MLP: ``ours.linear_fc1 = [hf.gate; hf.up]``, ``ours.linear_fc2 = hf.down``."""
    return [
        Rule(f"{ours}.linear_fc1.weight", (f"{hf}.{gate}.weight", f"{hf}.{up}.weight"), "glu"),
        Rule(f"{ours}.linear_fc2.weight", (f"{hf}.{down}.weight",)),
    ]


# --- HF config fields shared by Llama-style configs ---------------------------------------------


def rope_theta(hf: dict) -> float:
    """``rope_theta`` of a v4 (top level) or v5 (``rope_parameters``) config; plain RoPE only."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise ConvertError(
            f"rope_type={kind!r}: only plain RoPE ('default') is supported "
            "(no RoPE scaling in our model)"
        )
    theta = params.get("rope_theta", hf.get("rope_theta"))
    if theta is None:
        raise ConvertError("rope_theta is missing from the config and from its transformers class")
    if float(theta) != int(theta):
        raise ConvertError(f"rope_theta={theta}: our model takes an integer RoPE base")
    return float(theta)


# Fields that size the weights: a transformers config class fills them in with its reference
# model's sizes (MixtralConfig(): hidden 4096, 8 experts), which never describe another
# checkpoint, so config.json must give them.
SIZE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
)


def transformers_view(hf: dict, hf_class: str, config_class: str, required: tuple) -> dict:
    """config.json as transformers reads it (``from_pretrained`` builds ``config_class`` from
    the file's fields): every field the file leaves out takes the class's own default
    (rope_theta 1e6 for Mixtral and PhiMoE, rms_norm_eps 1e-5, ...), so that our model is the
    one transformers would load. ``required``: fields that must be in the file."""
    missing = [field for field in required if hf.get(field) is None]
    if missing:
        raise ConvertError(
            f"missing {', '.join(missing)}: {hf_class} needs "
            f"{'it' if len(missing) == 1 else 'them'} (the weights' sizes; transformers' "
            f"{config_class} would put in its reference model's)"
        )
    try:
        import transformers
        from huggingface_hub.errors import StrictDataclassError  # transformers 5's validation
    except ImportError as exc:
        raise ConvertError(
            "reading a Hugging Face config needs transformers: pip install -e '.[convert]'"
        ) from exc
    try:
        return getattr(transformers, config_class).from_dict(hf).to_dict()
    except (ValueError, TypeError, StrictDataclassError) as exc:
        reason = " ".join(str(exc).split())  # transformers' messages span lines
        raise ConvertError(f"transformers' {config_class} refuses it: {reason}") from exc


def require(hf: dict, field: str, allowed: Callable[[object], bool], what: str) -> None:
    value = hf.get(field)
    if not allowed(value):
        raise ConvertError(f"{field}={value!r}: {what}")


DTYPES_TO_OURS = {"float32": "fp32", "bfloat16": "bf16", "float16": "bf16"}
DTYPES_TO_HF = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def hf_dtype(hf: dict) -> str:
    return str(hf.get("dtype") or hf.get("torch_dtype") or "bfloat16").replace("torch.", "")


def train_within_window(section: dict, hf: dict) -> None:
    """A sliding window shorter than the context: within the window, full causal attention is
    the same thing, so train up to it (``model.seq_length`` capped at the window)."""
    window = hf.get("sliding_window")
    if window is not None and window < section["max_position_embeddings"]:
        section["seq_length"] = min(section["seq_length"], int(window))


def common_model_section(hf: dict, arch: str) -> dict:
    """``model.*`` fields every Llama-style config maps the same way."""
    require(
        hf,
        "hidden_act",
        lambda v: v in ("silu", None),
        "only SwiGLU (hidden_act='silu') is supported",
    )
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    max_pos = int(hf["max_position_embeddings"])
    return dict(
        num_layers=hf["num_hidden_layers"],
        hidden_size=hf["hidden_size"],
        num_attention_heads=heads,
        num_query_groups=hf.get("num_key_value_heads") or heads,
        kv_channels=head_dim,
        # Training sequence length: up to 4096 (override model.seq_length); RoPE works beyond.
        seq_length=min(max_pos, 4096),
        max_position_embeddings=max_pos,
        vocab_size=hf["vocab_size"],
        normalization="RMSNorm",
        norm_epsilon=hf["rms_norm_eps"],
        activation="swiglu",
        position_embedding="rope",
        rotary_base=rope_theta(hf),
        add_bias_linear=False,
        tie_embeddings=bool(hf["tie_word_embeddings"]),
        init_method_std=hf["initializer_range"],
        attention_dropout=float(hf["attention_dropout"]),
    )


def common_hf_config(model: ModelConfig, dtype: str) -> dict:
    n = model.num_attention_heads
    theta = float(model.rotary_base)
    return dict(
        vocab_size=model.vocab_size,
        hidden_size=model.hidden_size,
        num_hidden_layers=model.num_layers,
        num_attention_heads=n,
        num_key_value_heads=model.num_query_groups or n,
        head_dim=model.kv_channels or model.hidden_size // n,
        hidden_act="silu",
        max_position_embeddings=model.max_position_embeddings or model.seq_length,
        rms_norm_eps=model.norm_epsilon,
        rope_parameters={"rope_theta": theta, "rope_type": "default"},
        rope_theta=theta,  # transformers 4.x reads this one
        tie_word_embeddings=model.tie_embeddings,
        initializer_range=model.init_method_std,
        attention_dropout=model.attention_dropout,
        dtype=dtype,
        torch_dtype=dtype,
    )


def decoder_limits(model: ModelConfig) -> list[str]:
    """Why a model is not a pre-norm RMSNorm / SwiGLU / RoPE decoder with top-k routed experts
    and no biases, which every converted architecture but PhiMoE is (empty: it is)."""
    reasons = []
    if model.normalization != "RMSNorm":
        reasons.append(f"model.normalization={model.normalization!r} (needs RMSNorm)")
    if model.activation != "swiglu":
        reasons.append(f"model.activation={model.activation!r} (needs swiglu)")
    if model.position_embedding != "rope" or model.rotary_percent != 1.0:
        reasons.append("needs full RoPE (model.position_embedding=rope, rotary_percent=1)")
    if model.add_bias_linear:
        reasons.append("model.add_bias_linear=true (no linear biases)")
    if model.attention_output_bias or model.output_layer_bias:
        reasons.append(
            "needs no attention-output or LM-head bias (model.attention_output_bias, "
            "output_layer_bias)"
        )
    if model.mod is not None:
        reasons.append("model.mod (Mixture-of-Depths) has no Hugging Face equivalent")
    if model.moe is None:
        reasons.append("the model has no experts (model.moe)")
    elif model.moe.router != "topk":
        reasons.append(f"model.moe.router={model.moe.router!r} (needs Megatron's top-k router)")
    return reasons


def llama_like_limits(model: ModelConfig, qk_norm: bool = False) -> list[str]:
    """Why a model cannot be written as a Llama-style HF model (empty: it can). ``qk_norm``:
    the architecture has query and key norms (Qwen3-MoE per head, OLMoE per projection)."""
    reasons = decoder_limits(model)
    if model.attention != "standard":
        reasons.append(f"model.attention={model.attention!r} (needs plain attention)")
    if model.moe is not None and model.moe.score_function != "softmax":
        reasons.append(f"model.moe.score_function={model.moe.score_function!r} (needs softmax)")
    if model.qk_norm and not qk_norm:
        reasons.append("model.qk_norm=true (QK-norm: only Qwen3-MoE and OLMoE have it)")
    if model.mtp_layers:
        reasons.append(
            f"model.mtp_layers={model.mtp_layers} (multi-token prediction: only DeepSeek-V3 has it)"
        )
    if model.moe is not None and (model.moe.num_groups or model.moe.routed_scaling_factor):
        reasons.append(
            "group-limited routing or a routed scaling factor (model.moe.num_groups, "
            "routed_scaling_factor: DeepSeek-V2/V3's)"
        )
    return reasons


# --- whole models ---------------------------------------------------------------------------------


def megatron_state(
    rules: list[Rule], model: ModelConfig, weights, targets: dict[str, tuple]
) -> dict[str, torch.Tensor]:
    """Every Megatron parameter (``targets``: name -> shape) from the HF ``weights``
    (``weights.get(name, wanted_by)``, ``weights.names()``); refuses missing, misshapen or
    left-over tensors, naming them."""
    by_name = {r.megatron: r for r in rules}
    unmapped = sorted(set(targets) - set(by_name))
    if unmapped:
        raise ConvertError(
            f"no HF source for our parameters {unmapped[:5]} (the config does not "
            "describe this architecture)"
        )
    extra = sorted(set(by_name) - set(targets))
    if extra:
        raise ConvertError(f"the model built from the config lacks {extra[:5]}")
    leftover = sorted(weights.names() - {n for r in rules for n in r.hf})
    if leftover:
        raise ConvertError(
            f"HF tensors with no place in the model: {leftover[:5]}"
            f"{' ...' if len(leftover) > 5 else ''} (config.json does not match "
            "the weights)"
        )
    out = {}
    for name, shape in targets.items():
        rule = by_name[name]
        values = [weights.get(n, name) for n in rule.hf]
        out[name] = to_megatron(rule, values, tuple(shape), model)
    return out


def hf_state(
    rules: list[Rule], model: ModelConfig, params: dict[str, torch.Tensor], vocab: int
) -> dict[str, torch.Tensor]:
    """The HF tensors of a 1-rank model's parameters (``vocab``: the unpadded vocabulary)."""
    missing = sorted({r.megatron for r in rules} - set(params))
    if missing:
        raise ConvertError(f"the checkpoint's model has no {missing[:5]}")
    unused = sorted(set(params) - {r.megatron for r in rules})
    if unused:
        raise ConvertError(f"parameters with no place in the HF model: {unused[:5]}")
    out: dict[str, torch.Tensor] = {}
    for rule in rules:
        out.update(to_hf(rule, params[rule.megatron].detach(), model, vocab))
    return out
