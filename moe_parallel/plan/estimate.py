"""The step time of a layout from the ops one rank runs and the collectives it joins.

Per micro-batch and layer (plan/costs.py times each op; backward = 2x the forward's GEMM FLOPs
(input and weight gradients) and 2x its memory traffic):

- attention: the QKV and output projections as GEMMs split over TP; the score and value
  products as one GEMM per (micro-batch x local head), causal (half the FLOPs) under flash
  attention, full with the score tensor's softmax traffic when unfused (CPU ranks);
- norms, residual adds, RoPE, the activation: memory-bound;
- a dense MLP as two GEMMs split over TP; a MoE layer as the router GEMM, the top-k, the
  dispatch permutation and its inverse, the experts' grouped GEMMs at their real shape (tokens x
  top-k x ETP / local experts rows each, balanced routing assumed, widths split over ETP) and any
  shared expert;
- collectives: with TP + SP an all-gather and a reduce-scatter of the tokens around attention
  and around a dense MLP (or a shared expert), the mirror in backward; EP two all-to-alls of the
  routed tokens forward, two backward (ETP > 1: gathered and scattered over ETP too); PP one send
  forward and one backward per micro-batch and chunk; recomputation repeats the forward.

Per step: the busiest stage's micro-batch time x (m + bubble), the bubble of 1F1B being
(p - 1) / v micro-batch times; the optimizer's memory traffic; DP's gradient reduce-scatter and
parameter all-gather (all-reduce without the distributed optimizer) over the dense and
expert-data-parallel groups, hidden behind the last micro-batch's backward / the first's forward
only when the overlap options are on (``Overlap``; the project's Megatron config keeps them off);
EP all-to-alls hidden behind the expert compute of another micro-batch when ``expert_comm`` is on
(Megatron's overlap_moe_expert_parallel_comm); three small all-reduces over all ranks (loss,
gradient norm, expert load); the host time (profile's ``layer_host_s`` per layer
and micro-batch, ``step_host_s`` per step), added on CPUs, overlapped with the device on GPUs.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import RunConfig
from ..config.schema import ModelConfig
from .costs import Gemm, collective_time, exposed, gemm_time, memory_op_time, pipeline_bubble
from .hardware import HardwareProfile
from .memory import Layout, chunk_layers, chunk_parameters
from .params import attention_parameters

_VALUE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
STEP_REDUCTIONS = 3  # loss, gradient norm, expert load: one small all-reduce each per step


@dataclass(frozen=True)
class Overlap:
    """Which communication Megatron overlaps with compute (all off in this project's runs)."""

    grad_reduce: bool = False
    param_gather: bool = False
    expert_comm: bool = False


@dataclass
class StepTime:
    compute_s: float  # the busiest stage's ops over its micro-batches (+ its host time on CPUs)
    bubble_s: float
    ep_comm_s: float
    tp_comm_s: float
    pp_comm_s: float
    dp_comm_s: float  # exposed
    optimizer_s: float
    host_s: float  # the step's host time beyond the layers

    @property
    def total_s(self) -> float:
        return (
            self.compute_s
            + self.bubble_s
            + self.ep_comm_s
            + self.tp_comm_s
            + self.pp_comm_s
            + self.dp_comm_s
            + self.optimizer_s
            + self.host_s
        )

    def as_dict(self) -> dict:
        return {
            "step_s": self.total_s,
            "compute_s": self.compute_s,
            "bubble_s": self.bubble_s,
            "ep_comm_s": self.ep_comm_s,
            "tp_comm_s": self.tp_comm_s,
            "pp_comm_s": self.pp_comm_s,
            "dp_comm_s": self.dp_comm_s,
            "optimizer_s": self.optimizer_s,
            "host_s": self.host_s,
        }


@dataclass(frozen=True)
class Shapes:
    """What the ops of one micro-batch on one rank see."""

    tokens: int  # micro-batch tokens after CP (b x s / cp)
    seq: int  # sequence after CP
    batch: int
    tp: int
    sp_tokens: float  # tokens a rank holds between TP regions (tokens / TP with SP)
    value_bytes: int


@dataclass
class Cost:
    """Time of one piece (forward + backward of one micro-batch), split by kind, and the
    collective calls it makes (each costs the profile's ``collective_host_s`` of host time)."""

    compute: float = 0.0
    tp: float = 0.0
    ep: float = 0.0
    calls: float = 0.0

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(
            self.compute + other.compute,
            self.tp + other.tp,
            self.ep + other.ep,
            self.calls + other.calls,
        )

    def scaled(self, k: float) -> "Cost":
        return Cost(self.compute * k, self.tp * k, self.ep * k, self.calls * k)


def shapes_of(cfg: RunConfig, layout: Layout) -> Shapes:
    m = cfg.model
    seq = m.seq_length // layout.context
    tokens = layout.micro_batch_size * seq
    sp = tokens / layout.tensor if layout.sequence_parallel else tokens
    return Shapes(
        tokens, seq, layout.micro_batch_size, layout.tensor, sp, _VALUE_BYTES[layout.precision]
    )


def train_gemms(gemms: list[Gemm], hw: HardwareProfile, B: int) -> float:
    """Forward + backward of ``gemms`` (backward: input and weight gradients, each the
    forward's FLOPs)."""
    return 3 * sum(gemm_time(g, hw, B) for g in gemms)


def train_memory(nbytes: float, ops: int, hw: HardwareProfile) -> float:
    """Forward + backward of memory-bound ops (backward reads the saved input and the gradient,
    writes one: about twice the forward's traffic)."""
    return 3 * memory_op_time(nbytes, hw, ops)


def attention_cost(m: ModelConfig, layout: Layout, sh: Shapes, hw: HardwareProfile) -> Cost:
    d, H, t, B = m.hidden_size, m.num_attention_heads, sh.tp, sh.value_bytes
    hd = m.kv_channels or d // H
    proj_in = H * hd
    qkv_width = attention_parameters(m) / d - proj_in  # the rest of the attention's weights
    heads = sh.batch * H / t
    causal = 0.5 if hw.attention == "flash" else 1.0
    gemms = [
        Gemm(sh.tokens, d, qkv_width / t),
        Gemm(sh.seq * causal, hd, sh.seq, count=round(heads)),  # scores
        Gemm(sh.seq * causal, sh.seq, hd, count=round(heads)),  # scores x values
        Gemm(sh.tokens, proj_in / t, d),
    ]
    compute = train_gemms(gemms, hw, B)
    # norm + residual add on the sequence-parallel shard, RoPE on the local heads
    elementwise = 2 * sh.sp_tokens * d * B + 3 * sh.sp_tokens * d * B
    elementwise += 2 * sh.tokens * qkv_width / t * B
    ops = 4
    if hw.attention == "unfused":  # scale + mask, softmax, dropout over the score tensor
        elementwise += 3 * 2 * heads * sh.seq * sh.seq * B
        ops += 3
    compute += train_memory(elementwise, ops, hw)
    if layout.recompute == "selective":  # the attention core's forward again
        compute += sum(gemm_time(g, hw, B) for g in gemms[1:3])
    return Cost(compute=compute) + tp_exchange(sh, d, layout, hw)


def tp_exchange(
    sh: Shapes, width: int, layout: Layout, hw: HardwareProfile, row: bool = True
) -> Cost:
    """The collectives of one TP region (a column-parallel linear, then a row-parallel one).

    With SP (Megatron-core's tensor_parallel/layers.py and mappings.py): forward, the column
    linear all-gathers its input and the row linear reduce-scatters its output; backward, the
    row output's gradient is all-gathered, the column linear all-gathers its input again (it is
    not kept) for the weight gradient and reduce-scatters the input gradient: 3 all-gathers and
    2 reduce-scatters. Without SP: one all-reduce forward (row output), one backward (column
    input gradient). ``row=False``: a column linear alone (the output layer)."""
    if sh.tp <= 1:
        return Cost()
    size = sh.tokens * width * sh.value_bytes
    if not layout.sequence_parallel:
        ar = collective_time("all_reduce", size, sh.tp, hw.link("all_reduce", sh.tp, 1))
        return Cost(tp=2 * ar, calls=2) if row else Cost(tp=ar, calls=1)
    ag = collective_time("all_gather", size, sh.tp, hw.link("all_gather", sh.tp, 1))
    rs = collective_time("reduce_scatter", size, sh.tp, hw.link("reduce_scatter", sh.tp, 1))
    return Cost(tp=3 * ag + 2 * rs, calls=5) if row else Cost(tp=2 * ag + rs, calls=3)


def mlp_gemms(
    m: ModelConfig, rows: float, width: float, split: int, count: int = 1, grouped: bool = False
) -> list[Gemm]:
    glu = 2 if m.activation == "swiglu" else 1
    return [
        Gemm(rows, m.hidden_size, glu * width / split, count, grouped),
        Gemm(rows, width / split, m.hidden_size, count, grouped),
    ]


def dense_mlp_cost(m: ModelConfig, layout: Layout, sh: Shapes, hw: HardwareProfile, f: int) -> Cost:
    B, d = sh.value_bytes, m.hidden_size
    compute = train_gemms(mlp_gemms(m, sh.tokens, f, sh.tp), hw, B)
    # norm + residual on the shard, the activation on the local width
    compute += train_memory(5 * sh.sp_tokens * d * B + 3 * sh.tokens * f / sh.tp * B, 3, hw)
    return Cost(compute=compute) + tp_exchange(sh, d, layout, hw)


def moe_cost(m: ModelConfig, layout: Layout, sh: Shapes, hw: HardwareProfile) -> Cost:
    moe, d, B = m.moe, m.hidden_size, sh.value_bytes
    ep, etp = layout.expert, layout.expert_tensor_size
    local_experts = moe.num_experts // ep
    routed = sh.sp_tokens * moe.top_k  # token copies this rank sends
    arrived = routed * etp  # gathered over ETP (balanced routing: what arrives = what leaves)
    rows = arrived / local_experts
    f = moe.expert_ffn_hidden_size
    compute = train_gemms([Gemm(sh.sp_tokens, d, moe.num_experts)], hw, B)
    compute += train_gemms(mlp_gemms(m, rows, f, etp, local_experts, grouped=True), hw, B)
    # norm + residual, router softmax / top-k (fp32), permute + unpermute, the activation
    traffic = 5 * sh.sp_tokens * d * B + 3 * sh.sp_tokens * moe.num_experts * 4
    traffic += 2 * 2 * arrived * d * B + 3 * arrived * f / etp * B
    compute += train_memory(traffic, 6, hw)
    cost = Cost(compute=compute)
    if moe.shared_expert_ffn_hidden_size:
        cost = cost + dense_mlp_cost(m, layout, sh, hw, moe.shared_expert_ffn_hidden_size)
    size = routed * d * B
    a2a = collective_time("all_to_all", size, ep, hw.link("all_to_all", ep, etp))
    # the alltoall dispatcher first gathers every EP rank's token count per expert (Megatron's
    # MoEAlltoAllTokenDispatcher.preprocess): one small, latency-bound collective per forward
    counts = collective_time(
        "all_gather", moe.num_experts * 8 * ep, ep, hw.link("all_gather", ep, etp)
    )
    gathers = 0.0
    if etp > 1:
        gathers = 2 * collective_time("all_gather", size * etp, etp, hw.link("all_gather", etp, 1))
    ep_comm = 2 * (2 * a2a + gathers) + counts  # dispatch + combine, forward and backward
    # calls: the four all-to-alls (EP > 1), the count gather (over EP x ETP), the ETP gather of
    # the dispatched tokens and scatter of the combined ones, forward and backward
    calls = (4 if ep > 1 else 0) + (1 if ep * etp > 1 else 0) + (4 if etp > 1 else 0)
    return cost + Cost(ep=ep_comm, calls=calls)


def layer_cost(
    cfg: RunConfig, layout: Layout, sh: Shapes, hw: HardwareProfile, is_moe: bool
) -> Cost:
    m = cfg.model
    cost = attention_cost(m, layout, sh, hw)
    if is_moe:
        cost = cost + moe_cost(m, layout, sh, hw)
    else:
        cost = cost + dense_mlp_cost(m, layout, sh, hw, m.ffn_hidden_size)
    if layout.recompute == "full":  # the forward again: a third of forward + backward
        cost = cost + cost.scaled(1 / 3)
    return cost


def ends_cost(
    cfg: RunConfig,
    layout: Layout,
    sh: Shapes,
    hw: HardwareProfile,
    vocab: int,
    first: bool,
    last: bool,
) -> Cost:
    """The embedding lookup (first stage), the final norm, output layer and loss (last)."""
    d, B = cfg.model.hidden_size, sh.value_bytes
    cost = Cost()
    if first:
        cost.compute += train_memory(2 * sh.tokens * d * B, 1, hw)
    if last:
        cost.compute += train_gemms([Gemm(sh.tokens, d, vocab / sh.tp)], hw, B)
        # fp32 logits: softmax, loss, its gradient
        cost.compute += train_memory(
            3 * sh.tokens * vocab / sh.tp * 4 + 2 * sh.sp_tokens * d * B, 4, hw
        )
        cost = cost + tp_exchange(sh, d, layout, hw, row=False)  # the output layer
    return cost


def stage_microbatch(
    cfg: RunConfig, layout: Layout, hw: HardwareProfile, vocab: int, pp_rank: int
) -> tuple[Cost, int]:
    """Forward + backward of one micro-batch through all chunks of stage ``pp_rank``, and its
    number of layers."""
    sh = shapes_of(cfg, layout)
    pattern = cfg.model.moe_layer_pattern
    chunks = chunk_layers(cfg.model, layout, pp_rank)
    cost = Cost()
    for layer in (i for chunk in chunks for i in chunk):
        cost = cost + layer_cost(cfg, layout, sh, hw, bool(pattern[layer]))
    first = pp_rank == 0
    last = pp_rank == layout.pipeline - 1
    cost = cost + ends_cost(cfg, layout, sh, hw, vocab, first, last)
    # Megatron's DDP adds each weight's gradient into its fp32 main_grad after every micro-batch
    # (gradient_accumulation_fusion is off, config/megatron.py): read both, write main_grad
    numel = sum(trainable_numel(cfg.model, layout, vocab, pp_rank))
    cost = cost + Cost(compute=memory_op_time(numel * (sh.value_bytes + 8), hw))
    if layout.pipeline > 1:  # a send and a receive forward and backward per chunk
        cost = cost + Cost(calls=2 * len(chunks))
    return cost, sum(len(c) for c in chunks)


def with_host(device_s: float, host_s: float, hw: HardwareProfile) -> float:
    return max(device_s, host_s) if hw.host_overlaps_device else device_s + host_s


def estimate_step_time(
    cfg: RunConfig, layout: Layout, vocab: int, hw: HardwareProfile, overlap: Overlap = Overlap()
) -> StepTime:
    micro = max(cfg.train.global_batch_size // (layout.micro_batch_size * layout.data), 1)
    v = layout.virtual_pipeline or 1
    stages = []
    for pp_rank in range(layout.pipeline):
        cost, layers = stage_microbatch(cfg, layout, hw, vocab, pp_rank)
        ep_hidden = exposed(cost.ep, cost.compute / 2, overlap.expert_comm)
        host = layers * hw.layer_host_s + cost.calls * hw.collective_host_s
        stages.append((with_host(cost.compute, host, hw), cost, ep_hidden))
    busiest = max(stages, key=lambda s: s[0] + s[1].tp + s[2])
    compute, cost, ep_comm = busiest
    per_micro = compute + cost.tp + ep_comm
    sh = shapes_of(cfg, layout)
    pp_comm = 0.0
    if layout.pipeline > 1:
        send = collective_time(
            "p2p",
            sh.sp_tokens * cfg.model.hidden_size * sh.value_bytes,
            2,
            hw.link("p2p", 2, layout.tensor * layout.context * layout.data),
        )
        pp_comm = 2 * v * send * micro
    dense, expert = trainable_numel(cfg.model, layout, vocab)
    dp = dp_time(layout, dense, expert, hw)
    # grad reduce hides behind the last micro-batch's backward, param gather behind the first
    # forward (Megatron's overlap_grad_reduce / overlap_param_gather)
    dp_exposed = exposed(dp["grads"], per_micro * 2 / 3, overlap.grad_reduce) + exposed(
        dp["params"], per_micro / 3, overlap.param_gather
    )
    # the step's small reductions over all ranks: the loss, the gradient norm and the expert
    # load (Megatron's optimizer and the Trainer's step), latency-bound
    world = layout.world_size
    reductions = STEP_REDUCTIONS * collective_time(
        "all_reduce", 64, world, hw.link("all_reduce", world, 1)
    )
    shard = dense / max(layout.data * layout.context, 1) + expert / max(layout.expert_data, 1)
    if not layout.distributed_optimizer:
        shard = dense + expert
    # Adam over the rank's shard, and the whole fp32 gradient buffer zeroed for the next step
    optimizer = memory_op_time(
        shard * optimizer_bytes_per_element(layout) + (dense + expert) * 4, hw
    )
    return StepTime(
        compute_s=compute * micro,
        bubble_s=pipeline_bubble(per_micro, layout.pipeline, v),
        ep_comm_s=ep_comm * micro,
        tp_comm_s=cost.tp * micro,
        pp_comm_s=pp_comm,
        dp_comm_s=dp_exposed,
        optimizer_s=optimizer,
        host_s=hw.step_host_s + reductions,
    )


def optimizer_bytes_per_element(layout: Layout) -> int:
    """Adam's traffic per element: read the fp32 gradient, read and write exp_avg, exp_avg_sq and
    the fp32 main weight, write the model's weight (bf16: a copy beside the main one)."""
    main = 4 if layout.precision != "fp32" else 0
    return 4 + 2 * 4 + 2 * 4 + 2 * 4 + main + _VALUE_BYTES[layout.precision]


def trainable_numel(
    m: ModelConfig, layout: Layout, vocab: int, pp_rank: int = 0
) -> tuple[int, int]:
    """Dense and expert parameters with gradients on one rank of stage ``pp_rank``."""
    dense = expert = 0
    for vp in range(layout.virtual_pipeline or 1):
        for p in chunk_parameters(m, layout, vocab, pp_rank, vp):
            if not layout.trainable.trains(p.name):
                continue
            if p.expert:
                expert += p.numel
            else:
                dense += p.numel
    return dense, expert


def dp_time(layout: Layout, dense: int, expert: int, hw: HardwareProfile) -> dict:
    """DP's gradient reduction and parameter gather over the dense group (DP x CP, stride TP)
    and the expert-data-parallel group (stride EP x ETP), fp32 gradients."""
    B = _VALUE_BYTES[layout.precision]
    out = {"grads": 0.0, "params": 0.0}
    for numel, group, stride in (
        (dense, layout.data * layout.context, layout.tensor),
        (expert, layout.expert_data, layout.expert * layout.expert_tensor_size),
    ):
        if group <= 1 or numel == 0:
            continue
        if layout.distributed_optimizer:
            out["grads"] += collective_time(
                "reduce_scatter", numel * 4, group, hw.link("reduce_scatter", group, stride)
            )
            out["params"] += collective_time(
                "all_gather", numel * B, group, hw.link("all_gather", group, stride)
            )
        else:
            out["grads"] += collective_time(
                "all_reduce", numel * 4, group, hw.link("all_reduce", group, stride)
            )
    return out
