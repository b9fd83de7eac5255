"""Total and active parameters of a config's model, and its training FLOPs per token.

Counted from the config alone, tensor by tensor as Megatron-core builds the GPT model (the
integration tests compare these counts with the tensors of real checkpoints). "Active" is what
one token uses: every shared tensor plus ``top_k`` routed experts per MoE layer; embedding and
output layer included, which is how the papers report it (shared/notes/model-cards.md §12).
Mixture-of-Depths: "active" counts a routed block in full (what a chosen token uses); the FLOPs
count the expected cost, a routed block's matmuls at ``capacity`` and its attention at
``capacity^2``.

Shapes: d hidden size, H attention heads, G query groups (KV heads), h head dim, f FFN width,
E experts, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import RunConfig
from ..config.schema import ModelConfig


@dataclass(frozen=True)
class ParamCount:
    total: int
    active: int
    embedding: int  # input embedding (a lookup, not a matmul)
    matmul_active: int  # active parameters that multiply each token (for FLOPs)
    # Mixture-of-Depths: the attention layers' cost in full-layer units (a routed layer at
    # capacity c is c^2: c of the queries over c of the keys); None = num_layers.
    attention_layers: float | None = None
    # Multi-token prediction's modules (model.mtp_layers), counted apart as DeepSeek-V3 reports
    # them (671B main model + 14B MTP module): not in total or active. mtp_matmul (per token:
    # each module's active matmuls and its pass through the shared output layer) and
    # mtp_layers (attention layers) are in the FLOPs.
    mtp: int = 0
    mtp_active: int = 0
    mtp_matmul: int = 0
    mtp_layers: int = 0

    def flops_per_token(self, seq_length: int, num_layers: int, attn_width: int) -> int:
        """Training FLOPs per token: 6 per active matmul parameter (forward 2, backward 4)
        plus attention scores and values, 6 * 2 * s * (H*h) per layer (causal masking not
        subtracted, as in Megatron's and PaLM's accounting)."""
        layers = num_layers if self.attention_layers is None else self.attention_layers
        layers += self.mtp_layers
        matmul = self.matmul_active + self.mtp_matmul
        return round(6 * matmul + 12 * layers * seq_length * attn_width)


def count_parameters(model: ModelConfig, vocab_size: int | None = None) -> ParamCount:
    """``vocab_size``: the (padded) vocabulary to count; default ``model.vocab_size``."""
    V = vocab_size or model.vocab_size
    if V is None:
        raise ValueError(
            "model.vocab_size is not set (it comes from the tokenizer): pass the "
            "vocabulary size to count the embedding and output layer"
        )
    d = model.hidden_size
    norm = d if model.normalization == "RMSNorm" else 2 * d  # LayerNorm: weight and bias
    per_layer_shared = attention_parameters(model) + 2 * norm
    total = active = 0
    starts = []  # ``active`` at each layer's start (Mixture-of-Depths, below)
    total_starts = []  # ``total`` at each layer's start
    peer_layers = set(model.peer.layers) if model.peer else set()
    peer_matmul = 0  # PEER's per-token matmul parameters beyond its active ones (key scoring)
    for index, is_moe in enumerate(model.moe_layer_pattern):
        starts.append(active)
        total_starts.append(total)
        total += per_layer_shared
        active += per_layer_shared
        if index in peer_layers:
            peer = _peer(model)
            total, active = total + peer["total"], active + peer["active"]
            peer_matmul += peer["matmul_extra"]
            continue
        if not is_moe:
            ffn = _ffn(model, model.ffn_hidden_size)
            total, active = total + ffn, active + ffn
            continue
        moe = model.moe
        expert = _ffn(model, moe.expert_ffn_hidden_size)
        # The router: Megatron's gate is one [E, d] matrix; Yuan's attention router has three.
        always = d * moe.num_experts * (3 if moe.router == "attention" else 1)
        if moe.shared_expert_ffn_hidden_size:
            always += _ffn(model, moe.shared_expert_ffn_hidden_size)
            always += d if moe.shared_expert_gate else 0  # Qwen2-MoE's sigmoid gate
        if moe.expert_kind == "adapter":  # PESC: a shared FFN, adapters d -> a -> d, no bias
            always += expert
            expert = 2 * d * moe.adapter_dim
        total += always + moe.num_experts * expert
        active += always + moe.top_k * expert
    starts.append(active)
    # One MTP module: the last layer's structure, norms of the hidden state and of the next
    # token's embedding, their projection 2d -> d (no bias), a final norm (Megatron's
    # MultiTokenPredictionLayer); embedding and output layer are the main model's.
    last_total, last_active = total - total_starts[-1], starts[-1] - starts[-2]
    mtp_extra = 3 * norm + 2 * d * d
    mod_params, mod_skipped, attention_layers = _mixture_of_depths(model, starts)
    total, active = total + mod_params, active + mod_params
    embedding = V * d
    positions = (
        (model.max_position_embeddings or model.seq_length) * d
        if model.position_embedding == "learned_absolute"
        else 0
    )
    output = (0 if model.tie_embeddings else V * d) + (V if model.output_layer_bias else 0)
    ends = embedding + positions + norm + output  # + the final norm
    matmul = active + (V * d) + peer_matmul  # the output projection multiplies every token
    D = model.mtp_layers
    return ParamCount(
        total=total + ends,
        active=active + ends,
        embedding=embedding + positions,
        matmul_active=round(matmul - mod_skipped),
        attention_layers=attention_layers,
        mtp=D * (last_total + mtp_extra),
        mtp_active=D * (last_active + mtp_extra),
        mtp_matmul=D * (last_active + 2 * d * d + V * d),
        mtp_layers=D,
    )


def _mixture_of_depths(m: ModelConfig, starts: list[int]) -> tuple[int, float, float | None]:
    """Mixture-of-Depths (model/layers/mixture_of_depths.py): the routed layers' routers
    (w in R^d) and causal predictors (d -> h -> 1 with biases), which every token passes; the
    expected active parameters a token skips ((1 - capacity) of each routed block); and the
    attention cost in layers."""
    if m.mod is None:
        return 0, 0.0, None
    routed = m.mod.routed_layers(m.num_layers)
    h, d, c = m.mod.predictor_hidden_size, m.hidden_size, m.mod.capacity
    per_layer = d + ((d + 1) * h + h + 1 if m.mod.causal == "predictor" else 0)
    skipped = sum((1 - c) * (starts[i + 1] - starts[i]) for i in routed)
    return per_layer * len(routed), skipped, m.num_layers - len(routed) * (1 - c * c)


def attention_width(m: ModelConfig) -> int:
    """Heads x head size of the score and value products (their mean under MLA, whose queries
    and keys are qk_head_dim + qk_pos_emb_head_dim wide and values v_head_dim)."""
    H, a = m.num_attention_heads, m.latent_attention
    if a is not None:
        return H * (a.qk_head_dim + a.qk_pos_emb_head_dim + a.v_head_dim) // 2
    return H * (m.kv_channels or m.hidden_size // H)


def _latent_attention(m: ModelConfig) -> int:
    """MLA (Megatron's MLASelfAttention): query latent (down, norm, up) or a direct query
    projection, key-value latent with the shared RoPE key (down, norm, up), output."""
    a, d, H = m.latent_attention, m.hidden_size, m.num_attention_heads
    norm = 1 if m.normalization == "RMSNorm" else 2
    q_head = a.qk_head_dim + a.qk_pos_emb_head_dim
    if a.q_lora_rank is None:
        q = d * H * q_head
    else:
        q = d * a.q_lora_rank + norm * a.q_lora_rank + a.q_lora_rank * H * q_head
    kv = (
        d * (a.kv_lora_rank + a.qk_pos_emb_head_dim)
        + norm * a.kv_lora_rank
        + a.kv_lora_rank * H * (a.qk_head_dim + a.v_head_dim)
    )
    return q + kv + H * a.v_head_dim * d + (d if m.add_bias_linear else 0)


def attention_parameters(m: ModelConfig) -> int:
    if m.latent_attention is not None:
        return _latent_attention(m)
    d, H = m.hidden_size, m.num_attention_heads
    G = m.num_query_groups or H
    h = m.kv_channels or d // H
    qkv = d * (H + 2 * G) * h
    proj = H * h * d
    bias = ((H + 2 * G) * h if (m.add_qkv_bias or m.add_bias_linear) else 0) + (
        d if (m.add_bias_linear or m.attention_output_bias) else 0
    )
    # QK-norm: one norm of the head size for queries and one for keys, shared by the heads.
    qk_norm = 0
    if m.qk_norm:  # per head: one h-wide norm each; projection: over all query / key heads
        widths = (H + G) * h if m.qk_norm_scope == "projection" else 2 * h
        qk_norm = widths * (1 if m.normalization == "RMSNorm" else 2)
    return qkv + proj + bias + qk_norm + (_localized_filtering(d) if m.attention == "lfa" else 0)


def _localized_filtering(d: int) -> int:
    """Yuan's LFA: conv d -> d/2 and d/2 -> d, kernel 2, with biases, and an RMSNorm."""
    half = d // 2
    return (2 * d * half + half) + (2 * half * d + d) + d


def _peer(m: ModelConfig) -> dict:
    """PEER (model/layers/peer.py): query net [h*c, d], query BatchNorm (weight, bias), product
    keys [2, n, c/2], down and up tables [N, d]. Active per token: all but the tables, plus
    h*k rows of each. Each head scores all 2n sub-keys: h*n*c multiply-adds (the keys count once
    as active parameters, so h-1 more times for FLOPs)."""
    p, d = m.peer, m.hidden_size
    n, hc = math.isqrt(p.num_experts), p.heads * p.key_dim
    dense = hc * d + (2 * hc if p.query_batch_norm else 0) + n * p.key_dim
    return {
        "total": dense + 2 * p.num_experts * d,
        "active": dense + 2 * p.heads * p.top_k * d,
        "matmul_extra": (p.heads - 1) * n * p.key_dim - (2 * hc if p.query_batch_norm else 0),
    }


def _ffn(m: ModelConfig, f: int) -> int:
    d = m.hidden_size
    gated = m.activation == "swiglu"  # fc1 holds the gate and the up projection
    fc1 = d * f * (2 if gated else 1)
    fc2 = f * d
    bias = (f * (2 if gated else 1) + d) if m.add_bias_linear else 0
    return fc1 + fc2 + bias


def describe(cfg: RunConfig) -> dict:
    count = count_parameters(cfg.model)
    m = cfg.model
    attn_width = attention_width(m)
    flops = count.flops_per_token(m.seq_length, m.num_layers, attn_width)
    return {
        "name": cfg.name,
        "total_params": count.total,
        "active_params": count.active,
        "embedding_params": count.embedding,
        "mtp_params": count.mtp,
        "train_flops_per_token": flops,
        "train_flops_per_step": flops * cfg.train.global_batch_size * m.seq_length,
    }
