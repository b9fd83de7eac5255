"""Memory per GPU of a config under a parallel layout: weights, gradients, optimizer states and
activations, for every pipeline stage (the worst stage is what has to fit).

Weights, gradients and optimizer states are computed tensor by tensor, as Megatron-core 0.16.1
lays them out, so that they equal what a rank really allocates (tests/parallel/test_plan_memory.py
measures the DDP buffers and the optimizer state of real CPU ranks):

- every stage's parameters go into Megatron DDP's contiguous buffers, one for the dense
  parameters (sharded over the data x context-parallel group) and one for the expert parameters
  (sharded over the expert-data-parallel group, ``TP x CP x DP / (EP x ETP)`` ranks). Gradients
  are kept there in fp32 (``grad_reduce_in_fp32=True``, config/megatron.py). With the distributed
  optimizer the parameters live in a buffer too and every parameter starts at a multiple of 64
  elements and the buffer is padded to a multiple of lcm(group size, 128); one bucket per buffer
  (``overlap_grad_reduce=False``), plus its own bucket for a tied embedding under pipelining;
- Adam keeps exp_avg and exp_avg_sq in fp32 and, for bf16/fp16 weights, an fp32 main copy (for
  fp32 weights the main "copy" is a view of the weight). The distributed optimizer keeps them
  only for this rank's shard of each bucket (padding excluded), the plain one for everything.

Activations follow Korthikanti et al., "Reducing Activation Recomputation in Large Transformer
Models" (2022), per layer and per micro-batch, adapted to MoE and to what Megatron's modules save
for backward (measured with saved-tensor hooks on the local spec; the test keeps the estimate
within 15% of the measurement):

- attention block: the layer input, norm statistics and normalised input, the QKV input, Q/K/V,
  the softmax of the scores (b x a x s^2; none with flash attention) and the projection input;
- MoE block: the router's logits, scores, top-k indices and probabilities (fp32), the tokens
  routed to this rank's experts (tokens x top_k, balanced routing assumed: the real count varies
  with the routing), per routed token the expert FC1 output (2f for SwiGLU) and the activation
  intermediates; shared experts and dense FFN layers like a dense MLP;
- a pipeline stage keeps ``p - rank`` micro-batches in flight under 1F1B (interleaved: warm-up
  chunk micro-batches + 1, each holding L / (p x v) layers); the first stage also keeps the token
  ids, the last the output layer's input and the fp32 logits of the loss (s x b x V / t);
- recompute ``full`` keeps only each layer's input (plus one layer being recomputed), ``selective``
  drops the core-attention tensors (softmax, mask), as Megatron's ``core_attn`` recompute does.

Transient memory (dispatcher send/receive buffers of one MoE layer, the loss's logits gradient)
and a fixed framework overhead (CUDA context, NCCL buffers, allocator slack) are reported apart
and added to the total the fit check uses. Not modelled: context parallelism's attention split
beyond dividing by CP, FP8, activation offloading, allocator fragmentation beyond the overhead.

Shapes: d hidden, a heads, g query groups, hd head dim, f FFN width, E experts, k top-k,
V padded vocabulary, s sequence, b micro-batch, t TP, T tokens of a micro-batch on a rank.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Literal

from ..config import RunConfig
from ..config.rules import stage_layers
from ..config.schema import ModelConfig, ParallelSizes
from ..model.param_names import Trainable

GiB = 1024**3
# CUDA context, NCCL communicators and buffers, allocator slack: a documented rough constant.
FRAMEWORK_OVERHEAD_BYTES = int(2.5 * GiB)
_WEIGHT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}

Recompute = Literal["none", "selective", "full"]
Attention = Literal["flash", "unfused"]


@dataclass(frozen=True)
class Layout(ParallelSizes):
    """One way to place a run on GPUs (CP fixed by the config; the search keeps it at 1)."""

    tensor: int = 1
    pipeline: int = 1
    expert: int = 1
    data: int = 1
    expert_tensor: int | None = None  # None: same as tensor
    context: int = 1
    virtual_pipeline: int | None = None
    first_stage_layers: int | None = None  # uneven pipeline stages (parallel.*_stage_layers)
    last_stage_layers: int | None = None
    micro_batch_size: int = 1
    recompute: Recompute = "none"
    distributed_optimizer: bool = True
    sequence_parallel: bool = False
    precision: str = "bf16"
    trainable: Trainable = Trainable()  # which parameters get gradients and optimizer state

    @property
    def expert_data(self) -> int:
        """Size of the expert-data-parallel group (Megatron's expt_dp)."""
        return self.tensor * self.context * self.data // (self.expert * self.expert_tensor_size)

    @classmethod
    def of(cls, cfg: RunConfig, recompute: Recompute | None = None) -> "Layout":
        """The config's layout (``recompute``: None = the config's ``train.recompute``)."""
        recompute = cfg.train.recompute if recompute is None else recompute
        p = cfg.parallel
        return cls(
            tensor=p.tensor,
            pipeline=p.pipeline,
            expert=p.expert,
            data=p.data,
            expert_tensor=p.expert_tensor,
            context=p.context,
            virtual_pipeline=p.virtual_pipeline,
            first_stage_layers=p.first_stage_layers,
            last_stage_layers=p.last_stage_layers,
            micro_batch_size=cfg.train.micro_batch_size,
            recompute=recompute,
            distributed_optimizer=p.distributed_optimizer,
            sequence_parallel=p.sequence_parallel,
            precision=cfg.train.precision,
            trainable=Trainable.of(cfg),
        )

    def apply(self, cfg: RunConfig) -> RunConfig:
        """``cfg`` under this layout, validated by the config's own rules (ValueError if not)."""
        data = cfg.model_dump()
        data["parallel"].update(
            tensor=self.tensor,
            pipeline=self.pipeline,
            expert=self.expert,
            data=self.data,
            expert_tensor=self.expert_tensor,
            context=self.context,
            virtual_pipeline=self.virtual_pipeline,
            first_stage_layers=self.first_stage_layers,
            last_stage_layers=self.last_stage_layers,
            sequence_parallel=self.sequence_parallel,
            distributed_optimizer=self.distributed_optimizer,
        )
        data["train"].update(
            micro_batch_size=self.micro_batch_size,
            precision=self.precision,
            recompute=self.recompute,
        )
        return RunConfig.model_validate(data)

    def describe(self) -> str:
        parts = [f"TP{self.tensor}", f"PP{self.pipeline}", f"EP{self.expert}", f"DP{self.data}"]
        if self.expert_tensor_size != self.tensor:
            parts.append(f"ETP{self.expert_tensor_size}")
        if self.virtual_pipeline:
            parts.append(f"VPP{self.virtual_pipeline}")
        if self.sequence_parallel:
            parts.append("SP")
        return " ".join(parts)


@dataclass(frozen=True)
class Tensor:
    name: str
    numel: int
    expert: bool = False
    shared_embedding: bool = False  # tied embedding under pipelining: its own DDP bucket


@dataclass
class StageMemory:
    pp_rank: int
    weights: int
    grads: int
    optimizer: int
    activations: int  # tensors saved for backward, peak over the 1F1B schedule
    transient: int  # dispatcher buffers / logits gradient at the worst moment
    inflight_microbatches: int
    weight_numel: int
    optimizer_by_dp_rank: list[int] = field(default_factory=list)  # bytes, dense + expert shard

    @property
    def static(self) -> int:
        return self.weights + self.grads + self.optimizer

    @property
    def total(self) -> int:
        return self.static + self.activations + self.transient + FRAMEWORK_OVERHEAD_BYTES


@dataclass
class MemoryEstimate:
    layout: Layout
    stages: list[StageMemory]

    @property
    def worst(self) -> StageMemory:
        return max(self.stages, key=lambda st: st.total)

    @property
    def peak_bytes(self) -> int:
        return self.worst.total

    def as_dict(self) -> dict:
        worst = self.worst
        return {
            "layout": asdict(self.layout),
            "worst_stage": worst.pp_rank,
            "peak_gib": worst.total / GiB,
            "weights_gib": worst.weights / GiB,
            "grads_gib": worst.grads / GiB,
            "optimizer_gib": worst.optimizer / GiB,
            "activations_gib": worst.activations / GiB,
            "transient_gib": worst.transient / GiB,
            "overhead_gib": FRAMEWORK_OVERHEAD_BYTES / GiB,
            "stages": [
                {
                    "pp_rank": s.pp_rank,
                    "total_gib": s.total / GiB,
                    "weights": s.weights,
                    "grads": s.grads,
                    "optimizer": s.optimizer,
                    "activations": s.activations,
                    "transient": s.transient,
                }
                for s in self.stages
            ],
        }


# ---------------------------------------------------------------- parameters of one stage


def chunk_layers(model: ModelConfig, layout: Layout, pp_rank: int) -> list[list[int]]:
    """Layer indices of each model chunk of pipeline rank ``pp_rank`` (Megatron's split): chunk
    ``vp`` of rank ``r`` is virtual stage ``vp x p + r`` of the ``p x v`` that stage_layers
    sizes (uneven first / last stages exclude interleaving: config/rules.py)."""
    p, v = layout.pipeline, layout.virtual_pipeline or 1
    counts = stage_layers(
        model.num_layers, p * v, layout.first_stage_layers, layout.last_stage_layers
    )
    chunks = []
    for vp in range(v):
        stage = vp * p + pp_rank
        start = sum(counts[:stage])
        chunks.append(list(range(start, start + counts[stage])))
    return chunks


def chunk_parameters(
    model: ModelConfig, layout: Layout, vocab: int, pp_rank: int, vp: int
) -> list[Tensor]:
    """This chunk's parameters on one rank, in the order of ``module.parameters()``."""
    v = layout.virtual_pipeline or 1
    first = pp_rank == 0 and vp == 0
    last = pp_rank == layout.pipeline - 1 and vp == v - 1
    t, d = layout.tensor, model.hidden_size
    # Under pipelining the embedding has a copy on the last stage when the output layer is
    # tied to it or an MTP module reads it (the copy holds the tied weight), and both copies
    # get their own bucket (Megatron's shared_embedding).
    tied_split = model.tie_embeddings and layout.pipeline > 1
    mtp_copy = last and not first and model.mtp_layers > 0
    out: list[Tensor] = []
    if first or mtp_copy:
        shared = (model.tie_embeddings or model.mtp_layers > 0) and layout.pipeline > 1
        out.append(
            Tensor("embedding.word_embeddings.weight", vocab // t * d, shared_embedding=shared)
        )
    if first:
        if model.position_embedding == "learned_absolute":
            out.append(
                Tensor(
                    "embedding.position_embeddings.weight",
                    (model.max_position_embeddings or model.seq_length) * d,
                )
            )
    pattern = model.moe_layer_pattern
    for layer in chunk_layers(model, layout, pp_rank)[vp]:
        out.extend(_layer_parameters(model, layout, layer, bool(pattern[layer])))
        out.extend(_mod_parameters(model, layer))
    if last:
        out.extend(_norm(model, "decoder.final_layernorm"))
        out.extend(_multi_token_prediction(model, layout))
        if not model.tie_embeddings or (layout.pipeline > 1 and not mtp_copy):
            out.append(Tensor("output_layer.weight", vocab // t * d, shared_embedding=tied_split))
        if model.output_layer_bias:  # GRIN / PhiMoE (model/output_bias.py)
            out.append(Tensor("output_layer.bias", vocab // t))
    return out


def _norm(model: ModelConfig, name: str, width: int | None = None) -> list[Tensor]:
    d = width or model.hidden_size
    norm = [Tensor(f"{name}.weight", d)]
    if model.normalization == "LayerNorm":
        norm.append(Tensor(f"{name}.bias", d))
    return norm


def _multi_token_prediction(model: ModelConfig, layout: Layout) -> list[Tensor]:
    """The MTP modules (all on the last stage, Megatron's placement): per module the norms of
    the next token's embedding and of the hidden state, their projection 2d -> d (output split
    over TP), a layer like the last decoder layer, a final norm."""
    out = []
    last = model.num_layers - 1
    is_moe = bool(model.moe_layer_pattern[last])
    for k in range(model.mtp_layers):
        p = f"mtp.layers.{k}"
        out += _norm(model, f"{p}.enorm") + _norm(model, f"{p}.hnorm")
        d = model.hidden_size
        out += _linear(f"{p}.eh_proj", d // layout.tensor, 2 * d, None)
        out += _layer_tensors(model, layout, f"{p}.transformer_layer", is_moe, peer=False)
        out += _norm(model, f"{p}.final_layernorm")
    return out


def _mod_parameters(m: ModelConfig, layer: int) -> list[Tensor]:
    """Mixture-of-Depths (model/layers/mixture_of_depths.py): a routed layer's router [1, d]
    and causal predictor d -> h -> 1, replicated on every rank, after the block's tensors."""
    if m.mod is None or layer not in m.mod.routed_layers(m.num_layers):
        return []
    p, d, h = f"decoder.layers.{layer}", m.hidden_size, m.mod.predictor_hidden_size
    out = _linear(f"{p}.mod_router", 1, d, None)
    if m.mod.causal == "predictor":
        out += _linear(f"{p}.mod_predictor.fc1", h, d, h) + _linear(
            f"{p}.mod_predictor.fc2", 1, h, 1
        )
    return out


def _linear(
    name: str, out_features: int, in_features: int, bias: int | None, expert: bool = False
) -> list[Tensor]:
    tensors = [Tensor(f"{name}.weight", out_features * in_features, expert)]
    if bias:
        tensors.append(Tensor(f"{name}.bias", bias, expert))
    return tensors


def _layer_parameters(m: ModelConfig, layout: Layout, layer: int, is_moe: bool) -> list[Tensor]:
    peer = m.peer is not None and layer in m.peer.layers
    return _layer_tensors(m, layout, f"decoder.layers.{layer}", is_moe, peer)


def _layer_tensors(m: ModelConfig, layout: Layout, p: str, is_moe: bool, peer: bool) -> list:
    """One transformer layer's tensors under prefix ``p`` (a decoder layer, or the layer of a
    multi-token prediction module)."""
    t, d = layout.tensor, m.hidden_size
    a, g = m.num_attention_heads, m.num_query_groups or m.num_attention_heads
    hd = m.kv_channels or d // a
    bias = m.add_bias_linear
    out = _norm(m, f"{p}.input_layernorm")
    if m.latent_attention is not None:
        out += _latent_attention_parameters(m, t, f"{p}.self_attention")
        return out + _mlp_block(m, layout, p, is_moe, peer)
    out += _linear(
        f"{p}.self_attention.linear_proj",
        d,
        a * hd // t,
        d if (bias or m.attention_output_bias) else None,
    )
    qkv = (a + 2 * g) * hd // t
    out += _linear(
        f"{p}.self_attention.linear_qkv", qkv, d, qkv if (bias or m.add_qkv_bias) else None
    )
    if m.qk_norm and m.qk_norm_scope == "projection":  # OLMoE: whole projections, split by TP
        out += _norm(m, f"{p}.self_attention.q_layernorm", a * hd // t)
        out += _norm(m, f"{p}.self_attention.k_layernorm", g * hd // t)
    elif m.qk_norm:  # per-head norms of queries and keys, replicated over TP
        out += _norm(m, f"{p}.self_attention.q_layernorm", hd)
        out += _norm(m, f"{p}.self_attention.k_layernorm", hd)
    if m.attention == "lfa":  # Yuan's filter lives in the q/k/v projection (model/layers/lfa.py)
        f = f"{p}.self_attention.linear_qkv.filter"
        out += _linear(f"{f}.conv1", d // 2, 2 * d, d // 2) + _linear(f"{f}.conv2", d, d, d)
        out += [Tensor(f"{f}.output_layernorm.weight", d)]
    return out + _mlp_block(m, layout, p, is_moe, peer)


def _latent_attention_parameters(m: ModelConfig, t: int, p: str) -> list[Tensor]:
    """Megatron's MLASelfAttention on the local spec: the output projection, the query latent
    (down, up; or one direct projection), the key-value latent with the shared RoPE key (down,
    up), then the two latent norms; every projection's output is split over TP (the down
    projections' too), the norms are replicated."""
    a, d, H = m.latent_attention, m.hidden_size, m.num_attention_heads
    q_head = a.qk_head_dim + a.qk_pos_emb_head_dim
    out = _linear(f"{p}.linear_proj", d, H * a.v_head_dim // t, None)
    if a.q_lora_rank is None:
        out += _linear(f"{p}.linear_q_proj", H * q_head // t, d, None)
    else:
        out += _linear(f"{p}.linear_q_down_proj", a.q_lora_rank // t, d, None)
        out += _linear(f"{p}.linear_q_up_proj", H * q_head // t, a.q_lora_rank, None)
    out += _linear(
        f"{p}.linear_kv_down_proj", (a.kv_lora_rank + a.qk_pos_emb_head_dim) // t, d, None
    )
    kv_head = a.qk_head_dim + a.v_head_dim
    out += _linear(f"{p}.linear_kv_up_proj", H * kv_head // t, a.kv_lora_rank, None)
    if a.q_lora_rank is not None:
        out += _norm(m, f"{p}.q_layernorm", a.q_lora_rank)
    return out + _norm(m, f"{p}.kv_layernorm", a.kv_lora_rank)


def _mlp_block(m: ModelConfig, layout: Layout, p: str, is_moe: bool, peer: bool) -> list:
    t, d = layout.tensor, m.hidden_size
    bias = m.add_bias_linear
    out = _norm(m, f"{p}.pre_mlp_layernorm")
    if peer:
        return out + _peer_parameters(m, layout, f"{p}.mlp")
    if not is_moe:
        return out + _mlp(m, f"{p}.mlp", m.ffn_hidden_size, t)
    moe = m.moe
    rows = moe.num_experts * (3 if moe.router == "attention" else 1)  # Yuan: Q, K, V
    out += _linear(f"{p}.mlp.router", rows, d, moe.num_experts if bias else None)
    etp = layout.expert_tensor_size
    local = moe.num_experts // layout.expert
    adapters = moe.expert_kind == "adapter"  # PESC: adapters d -> a -> d and a shared FFN
    for e in range(local):
        name = f"{p}.mlp.experts.local_experts.{e}"
        out += (
            _linear(f"{name}.linear_fc1", moe.adapter_dim // etp, d, None, True)
            + _linear(f"{name}.linear_fc2", d, moe.adapter_dim // etp, None, True)
            if adapters
            else _mlp(m, name, moe.expert_ffn_hidden_size, etp, expert=True)
        )
    if adapters:
        out += _mlp(m, f"{p}.mlp.shared_ffn", moe.expert_ffn_hidden_size, t)
    if moe.shared_expert_ffn_hidden_size:
        out += _mlp(m, f"{p}.mlp.shared_experts", moe.shared_expert_ffn_hidden_size, t)
        if getattr(moe, "shared_expert_gate", False):  # Qwen2-MoE's sigmoid gate [1, d]
            out.append(Tensor(f"{p}.mlp.shared_experts.gate_weight", d))
    return out


def _peer_parameters(m: ModelConfig, layout: Layout, p: str) -> list[Tensor]:
    """PEER (model/layers/peer.py): dense query net, BatchNorm and product keys; the two expert
    tables sharded over EP (expert-parallel parameters). Activations are planned as the dense
    FFN's (not modelled)."""
    peer, d = m.peer, m.hidden_size
    hc, rows = peer.heads * peer.key_dim, peer.num_experts // layout.expert
    out = [Tensor(f"{p}.query.weight", hc * d)]
    if peer.query_batch_norm:
        out += [Tensor(f"{p}.query_norm.weight", hc), Tensor(f"{p}.query_norm.bias", hc)]
    out.append(Tensor(f"{p}.product_keys.weight", math.isqrt(peer.num_experts) * peer.key_dim))
    return out + [
        Tensor(f"{p}.expert_down.weight", rows * d, True),
        Tensor(f"{p}.expert_up.weight", rows * d, True),
    ]


def _mlp(m: ModelConfig, name: str, f: int, t: int, expert: bool = False) -> list[Tensor]:
    d, glu = m.hidden_size, 2 if m.activation == "swiglu" else 1
    bias = m.add_bias_linear
    return _linear(
        f"{name}.linear_fc1", glu * f // t, d, glu * f // t if bias else None, expert
    ) + _linear(f"{name}.linear_fc2", d, f // t, d if bias else None, expert)


# ---------------------------------------------------------------- DDP buffers and optimizer


@dataclass(frozen=True)
class Buffer:
    numel: int  # padded
    ranges: list[tuple[int, int]]  # each parameter's [start, end) in the buffer
    buckets: list[tuple[int, int]]


def ddp_buffer(params: list[Tensor], group: int, distributed: bool) -> Buffer:
    """Megatron's _ParamAndGradBuffer layout (bucket_size=None: overlap_grad_reduce is off)."""

    def pad(n: int, k: int) -> int:
        return -(-n // k) * k

    end_pad = math.lcm(group, 128) if distributed else 1
    start_pad = 64 if distributed else 1
    ranges, buckets = [], []
    start = bucket_start = 0
    in_bucket = 0
    for p in reversed(params):  # Megatron walks the parameters backwards (backprop order)
        start = pad(start, start_pad)
        split = p.shared_embedding and distributed
        if split and in_bucket:
            start = pad(start, end_pad)
            buckets.append((bucket_start, start))
            bucket_start, in_bucket = start, 0
        ranges.append((start, start + p.numel))
        in_bucket += 1
        start += p.numel
        if split:
            start = pad(start, end_pad)
            buckets.append((bucket_start, start))
            bucket_start, in_bucket = start, 0
    if in_bucket:
        start = pad(start, end_pad)
        buckets.append((bucket_start, start))
    return Buffer(numel=start, ranges=ranges, buckets=buckets)


def shard_numel(buffer: Buffer, group: int, rank: int) -> int:
    """Parameter elements in DP rank ``rank``'s shard of every bucket (padding excluded)."""
    total = 0
    for b_start, b_end in buffer.buckets:
        size = (b_end - b_start) // group
        lo, hi = b_start + rank * size, b_start + (rank + 1) * size
        for start, end in buffer.ranges:
            total += max(0, min(end, hi) - max(start, lo))
    return total


_STATIC_CACHE: dict = {}


def static_memory(model: ModelConfig, layout: Layout, vocab: int, pp_rank: int) -> dict:
    """Weights, gradients and optimizer bytes of one rank of stage ``pp_rank`` (per DP rank)."""
    # micro-batch and recompute do not change them: the layout search asks many times
    key = (id(model), replace(layout, micro_batch_size=1, recompute="none"), vocab, pp_rank)
    hit = _STATIC_CACHE.get(key)
    if hit is None or hit[0] is not model:
        if len(_STATIC_CACHE) > 4096:
            _STATIC_CACHE.clear()
        hit = _STATIC_CACHE[key] = (model, _static_memory(model, layout, vocab, pp_rank))
    return hit[1]


def _static_memory(model: ModelConfig, layout: Layout, vocab: int, pp_rank: int) -> dict:
    wbytes = _WEIGHT_BYTES[layout.precision]
    dist = layout.distributed_optimizer
    dense_group = layout.data * layout.context
    expert_group = layout.expert_data
    weights = grads = numel = 0
    shards = [0] * dense_group  # optimizer elements per DP rank (expert part by expert-DP rank)
    full_opt = 0
    for vp in range(layout.virtual_pipeline or 1):
        params = chunk_parameters(model, layout, vocab, pp_rank, vp)
        # Frozen parameters stay out of Megatron's DDP buffers: their own storage, no gradient,
        # no optimizer state.
        frozen = [p.numel for p in params if not layout.trainable.trains(p.name)]
        weights += sum(frozen) * wbytes
        numel += sum(frozen)
        params = [p for p in params if layout.trainable.trains(p.name)]
        for expert, group in ((False, dense_group), (True, expert_group)):
            mine = [p for p in params if p.expert == expert]
            if not mine:
                continue
            buf = ddp_buffer(mine, group, dist)
            numel += sum(p.numel for p in mine)
            weights += (buf.numel if dist else sum(p.numel for p in mine)) * wbytes
            grads += buf.numel * 4
            full_opt += sum(p.numel for p in mine)
            if dist:
                for r in range(dense_group):
                    # DP rank r is expert-DP rank r % expert_group under Megatron's rank order
                    shards[r] += shard_numel(buf, group, r % group if expert else r)
    per_elem = 8 + (4 if layout.precision != "fp32" else 0)  # exp_avg, exp_avg_sq (+ fp32 main)
    by_rank = [s * per_elem for s in shards] if dist else [full_opt * per_elem] * dense_group
    return {
        "weights": weights,
        "grads": grads,
        "optimizer_by_dp_rank": by_rank,
        "optimizer": max(by_rank),
        "numel": numel,
    }


# ---------------------------------------------------------------- activations


def layer_activation_bytes(
    m: ModelConfig, layout: Layout, is_moe: bool, attention: Attention
) -> dict[str, int]:
    """Bytes saved for backward by one layer for one micro-batch on one rank, by part."""
    B = _WEIGHT_BYTES[layout.precision]
    t, cp = layout.tensor, layout.context
    s, b = m.seq_length // cp, layout.micro_batch_size
    T = s * b  # tokens of the micro-batch on this rank (before sequence parallelism)
    Tsp = T // t if layout.sequence_parallel else T  # tokens in the norm/residual region
    d, a = m.hidden_size, m.num_attention_heads
    g = m.num_query_groups or a
    hd = m.kv_channels or d // a
    width = a * hd // t  # attention width on this rank
    fused = attention == "flash"
    # fused (TE) norm: input and rstd; torch's RMSNorm/LayerNorm upcast: fp32 input, x*rstd, rstd
    norm = Tsp * d * B + Tsp * 4 if fused else (2 * Tsp * d + Tsp) * 4
    parts: dict[str, int] = {}
    # attention: norm, QKV input (SP: the local shard, re-gathered in backward), Q/K/V, scores
    parts["attn_norm"] = norm
    if m.latent_attention is not None:
        parts.update(_latent_attention_saved(m, layout, T, Tsp, fused, B))
        return _with_mlp_saved(parts, m, layout, is_moe, fused, B, norm, T, Tsp)
    parts["qkv_input"] = Tsp * d * B
    if m.attention == "lfa":
        # Yuan's filter runs on the whole (gathered) sequence on every TP rank: the raw input and
        # its shifted copy, conv1's output and its shifted copy (d/2), the norm's input and the
        # filtered q/k input (model/layers/lfa.py); the norm is torch's (fp32 upcast)
        parts["qkv_input"] = 4 * T * d * B + (2 * T * d + T) * 4
    rope = 4 * s * hd * B if m.position_embedding == "rope" else 0
    if fused:  # flash attention: Q, K, V (not expanded), output, log-sum-exp
        qkv = T * (a + 2 * g) * hd // t * B + T * width * B + b * (a // t) * s * 4
        scores = 0
    else:  # Megatron's unfused DotProductAttention: Q, K, V expanded to all heads
        v_store = T * width if g < a else T * (a + 2 * g) * hd // t  # MHA: a view of QKV
        qkv = (2 * T * width + v_store) * B
        # softmax output in fp32 (attention_softmax_in_fp32), its cast for the bmm, bool mask
        probs = b * (a // t) * s * (s * cp)
        scores = probs * 4 + (probs * B if B != 4 else 0) + s * s
    parts["qkv_rope"] = qkv + rope
    parts["attn_scores"] = scores
    parts["proj_input"] = T * width * B
    return _with_mlp_saved(parts, m, layout, is_moe, fused, B, norm, T, Tsp)


def _latent_attention_saved(m: ModelConfig, layout: Layout, T, Tsp, fused, B) -> dict[str, int]:
    """MLA's saved tensors per micro-batch: the (gathered) input of the down projections, each
    latent's norm (torch's, fp32 upcast, unless fused) and up-projection input, the queries and
    keys (no-RoPE and RoPE parts, then joined), the values, the scores as for standard
    attention, and the output projection's input."""
    a, H, t = m.latent_attention, m.num_attention_heads, layout.tensor
    s, b, cp = m.seq_length // layout.context, layout.micro_batch_size, layout.context

    def latent_norm(width: int) -> int:
        return T * width * B + T * 4 if fused else (2 * T * width + T) * 4

    q_head, heads = a.qk_head_dim + a.qk_pos_emb_head_dim, H // t
    parts = {"qkv_input": T * m.hidden_size * B}
    latents = latent_norm(a.kv_lora_rank) + T * a.kv_lora_rank * B
    if a.q_lora_rank is not None:
        latents += latent_norm(a.q_lora_rank) + T * a.q_lora_rank * B
    parts["latents"] = latents
    # q and k: RoPE inputs and outputs of the rope parts, the joined heads; v
    rope = 2 * T * (heads + 1) * a.qk_pos_emb_head_dim * B
    qkv = (2 * T * heads * q_head + T * heads * a.v_head_dim) * B
    parts["qkv_rope"] = qkv + rope
    if fused:
        parts["attn_scores"] = T * heads * a.v_head_dim * B + b * heads * s * 4
    else:
        probs = b * heads * s * (s * cp)
        parts["attn_scores"] = probs * 4 + (probs * B if B != 4 else 0) + s * s
    parts["proj_input"] = T * heads * a.v_head_dim * B
    return parts


def _with_mlp_saved(parts, m: ModelConfig, layout: Layout, is_moe, fused, B, norm, T, Tsp):
    """The layer's parts with its FFN or MoE block's saved tensors added."""
    t, d = layout.tensor, m.hidden_size
    parts["mlp_norm"] = norm + Tsp * d * B  # + the normalised output, the FFN/router input
    glu = m.activation == "swiglu"
    if not is_moe:
        parts["ffn"] = _mlp_saved(T, m.ffn_hidden_size // t, glu, fused, B)
        return parts
    moe = m.moe
    E, k = moe.num_experts, moe.top_k
    if moe.shared_expert_ffn_hidden_size:
        parts["shared_experts"] = _mlp_saved(
            T, moe.shared_expert_ffn_hidden_size // t, glu, fused, B
        )
    # router (fp32 logits, scores, probs; int64 indices), over this rank's tokens
    parts["router"] = Tsp * (13 * E + 28 * k + 4) + 8 * E
    if moe.router == "attention":  # Yuan: fp32 Q, K, V in R^E and the E x E softmax per token
        parts["router"] += Tsp * (E * E + 3 * E) * 4
    etp = layout.expert_tensor_size
    routed = Tsp * k * etp  # tokens x top_k reaching this rank's experts (balanced routing)
    f = moe.expert_ffn_hidden_size // etp
    local = E // layout.expert
    per_token = (2 * f if glu else f) + (f if fused else (4 * f if glu else 3 * f))
    if moe.expert_kind == "adapter":  # PESC: the shared FFN, then non-gated adapters of width a
        parts["shared_ffn"] = _mlp_saved(T, moe.expert_ffn_hidden_size // t, glu, fused, B)
        f = moe.adapter_dim // etp
        per_token = f + (f if fused else 2 * f)
    parts["experts"] = routed * d * B + routed * per_token * B + local * routed * 4
    return parts


def _mlp_saved(T: int, f: int, glu: bool, fused: bool, B: int) -> int:
    """FC1 output, activation intermediates (unfused: 3 for SwiGLU, 2 else; fused: 1)."""
    return T * ((2 * f if glu else f) + (f if fused else (3 * f if glu else 2 * f))) * B


def stage_activations(
    m: ModelConfig,
    layout: Layout,
    vocab: int,
    pp_rank: int,
    attention: Attention,
    microbatches: int,
) -> tuple[int, int, int]:
    """(saved bytes at the peak, transient bytes, micro-batches in flight) of stage ``pp_rank``;
    ``microbatches``: per step and DP rank (caps the in-flight count)."""
    B = _WEIGHT_BYTES[layout.precision]
    p, v = layout.pipeline, layout.virtual_pipeline or 1
    t = layout.tensor
    s, b = m.seq_length // layout.context, layout.micro_batch_size
    T = s * b
    Tsp = T // t if layout.sequence_parallel else T
    chunks = chunk_layers(m, layout, pp_rank)
    pattern = m.moe_layer_pattern
    per_chunk = []
    for vp, layers in enumerate(chunks):
        total = 0
        layer_full = []
        for layer in layers:
            parts = layer_activation_bytes(m, layout, bool(pattern[layer]), attention)
            full = sum(parts.values())
            layer_full.append(full)
            if layout.recompute == "full":
                total += Tsp * m.hidden_size * B  # only the layer's input
            elif layout.recompute == "selective":
                total += full - parts["attn_scores"]
            else:
                total += full
        if pp_rank == 0 and vp == 0:
            total += T * 8  # token ids kept by the embedding
        ends = 0
        if pp_rank == p - 1 and vp == v - 1:
            final_norm = (
                Tsp * m.hidden_size * B + Tsp * 4
                if attention == "flash"
                else (2 * Tsp * m.hidden_size + Tsp) * 4
            )
            ends += final_norm + Tsp * m.hidden_size * B  # final norm, output layer input
            ends += T * (vocab // t) * 4 + T * 16  # fp32 softmax of the loss, labels, mask
            ends += m.mtp_layers * _mtp_module_saved(m, layout, vocab, attention, final_norm)
        per_chunk.append((total + ends, max(layer_full, default=0), ends))
    if v == 1:
        inflight = min(p - pp_rank, microbatches)
        saved = inflight * per_chunk[0][0]
    else:  # interleaved 1F1B: warm-up chunk micro-batches + 1, spread over the chunks
        inflight = min((p - pp_rank - 1) * 2 + (v - 1) * p + 1, microbatches * v)
        saved = sum(per_chunk[i % v][0] for i in range(inflight))
    if layout.recompute == "full":
        # Backward frees the loss's, output layer's and final norm's tensors of the micro-batch
        # before it recomputes its last layer: the peak holds one of the two, not both.
        ends = per_chunk[-1][2]
        saved += max(ends, max(c[1] for c in per_chunk)) - ends
    moe = m.moe
    dispatch = 2 * Tsp * moe.top_k * layout.expert_tensor_size * m.hidden_size * B if moe else 0
    logits_grad = T * (vocab // t) * 4 if pp_rank == p - 1 else 0
    return saved, max(dispatch, logits_grad), inflight


def _mtp_module_saved(m: ModelConfig, layout: Layout, vocab: int, attention, norm: int) -> int:
    """One multi-token prediction module per micro-batch: its two input norms and their joined
    output (the projection's input), a layer like the last decoder layer, its final norm, and
    the output layer's input and fp32 loss softmax for its own loss."""
    B = _WEIGHT_BYTES[layout.precision]
    T = m.seq_length // layout.context * layout.micro_batch_size
    Tsp = T // layout.tensor if layout.sequence_parallel else T
    d = m.hidden_size
    last_is_moe = bool(m.moe_layer_pattern[-1])
    layer = sum(layer_activation_bytes(m, layout, last_is_moe, attention).values())
    inputs = 2 * norm + 2 * Tsp * d * B
    return inputs + layer + norm + Tsp * d * B + T * (vocab // layout.tensor) * 4 + T * 16


def estimate_memory(
    cfg: RunConfig,
    layout: Layout | None = None,
    vocab: int | None = None,
    attention: Attention = "flash",
) -> MemoryEstimate:
    """Every stage's bytes per GPU; ``vocab``: the padded vocabulary (default: the config's,
    padded as Megatron does to a multiple of 128 x TP)."""
    layout = layout or Layout.of(cfg)
    m = cfg.model
    if vocab is None:
        if m.vocab_size is None:
            raise ValueError("model.vocab_size is not set (it comes from the tokenizer)")
        multiple = math.lcm(128, layout.tensor)
        vocab = -(-m.vocab_size // multiple) * multiple
    micro = cfg.train.global_batch_size // (layout.micro_batch_size * layout.data)
    stages = []
    for pp_rank in range(layout.pipeline):
        st = static_memory(m, layout, vocab, pp_rank)
        saved, transient, inflight = stage_activations(
            m, layout, vocab, pp_rank, attention, max(micro, 1)
        )
        stages.append(
            StageMemory(
                pp_rank=pp_rank,
                weights=st["weights"],
                grads=st["grads"],
                optimizer=st["optimizer"],
                activations=saved,
                transient=transient,
                inflight_microbatches=inflight,
                weight_numel=st["numel"],
                optimizer_by_dp_rank=st["optimizer_by_dp_rank"],
            )
        )
    return MemoryEstimate(layout, stages)
