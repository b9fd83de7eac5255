"""A rough step time of a layout: compute at an assumed MFU plus the communication the layout adds.

step = compute + pipeline bubble + exposed communication, with

- compute: training FLOPs of the global batch (plan/params.py: 6 x active matmul parameters + the
  attention scores) / (GPUs x peak x MFU); recompute adds a forward (full: + 1/3 of the FLOPs,
  selective: the attention scores' forward again);
- pipeline bubble (1F1B): compute x (p - 1) / (m x v) (interleaving divides it by v);
- expert parallelism: every MoE layer all-to-alls the routed tokens (tokens x top_k x d) twice in
  the forward and twice in the backward, (EP - 1) / EP of them leaving the GPU;
- tensor parallelism: per layer 2 all-gathers + 2 reduce-scatters of the activations (s x b x d)
  forward, as many backward, each moving (t - 1) / t of the tensor; the expert FFN's own
  tensor-parallel exchange is counted with the same formula at ETP;
- data parallelism: a reduce-scatter of the fp32 gradients (distributed optimizer) and an
  all-gather of the bf16 weights, or one all-reduce (2x) without it, once per step, over the
  dense and expert-data-parallel groups; assumed not overlapped with compute (overlap is off).

Bandwidths are per GPU: NVLink inside a node (``gpus_per_node`` ranks), InfiniBand across; a group
that fits in a node uses NVLink. Nothing is overlapped, so the figure is pessimistic; it is meant
to rank layouts, not to predict a run to the second.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import RunConfig
from ..config.rules import stage_layers
from .memory import Layout
from .params import count_parameters

# H100 SXM dense BF16 peak (NVIDIA H100 datasheet: 989 TFLOP/s without sparsity).
H100_BF16_PEAK_FLOPS = 989e12
ASSUMED_MFU = 0.40  # model FLOPs utilisation of well-tuned Megatron MoE runs (roughly 35-45%)
NVLINK_BYTES_PER_S = 450e9  # H100 NVLink 4, per direction per GPU (900 GB/s bidirectional)
INFINIBAND_BYTES_PER_S = 50e9  # 400 Gb/s NDR per GPU
GPUS_PER_NODE = 8


@dataclass(frozen=True)
class Hardware:
    peak_flops: float = H100_BF16_PEAK_FLOPS
    mfu: float = ASSUMED_MFU
    intra_node_bw: float = NVLINK_BYTES_PER_S
    inter_node_bw: float = INFINIBAND_BYTES_PER_S
    gpus_per_node: int = GPUS_PER_NODE

    def bandwidth(self, group_size: int, stride: int) -> float:
        """Bandwidth of a group of ``group_size`` ranks ``stride`` apart in rank order."""
        return (
            self.intra_node_bw if group_size * stride <= self.gpus_per_node else self.inter_node_bw
        )


@dataclass
class StepTime:
    compute_s: float
    bubble_s: float
    ep_comm_s: float
    tp_comm_s: float
    dp_comm_s: float

    @property
    def total_s(self) -> float:
        return self.compute_s + self.bubble_s + self.ep_comm_s + self.tp_comm_s + self.dp_comm_s

    def as_dict(self) -> dict:
        return {
            "step_s": self.total_s,
            "compute_s": self.compute_s,
            "bubble_s": self.bubble_s,
            "ep_comm_s": self.ep_comm_s,
            "tp_comm_s": self.tp_comm_s,
            "dp_comm_s": self.dp_comm_s,
        }


def estimate_step_time(
    cfg: RunConfig, layout: Layout, vocab: int, hw: Hardware = Hardware()
) -> StepTime:
    m, moe = cfg.model, cfg.model.moe
    count = count_parameters(m, vocab)
    a, hd = m.num_attention_heads, m.kv_channels or m.hidden_size // m.num_attention_heads
    attn = 12 * m.num_layers * m.seq_length * a * hd  # per token, forward + backward
    tokens = cfg.train.global_batch_size * m.seq_length
    flops = (6 * count.matmul_active + attn) * tokens
    if layout.recompute == "full":
        flops *= 4 / 3
    elif layout.recompute == "selective":
        flops += attn / 3 * tokens
    gpus = layout.world_size
    compute = flops / (gpus * hw.peak_flops * hw.mfu)
    micro = max(cfg.train.global_batch_size // (layout.micro_batch_size * layout.data), 1)
    v = layout.virtual_pipeline or 1
    bubble = compute * (layout.pipeline - 1) / (micro * v)
    B = 2 if layout.precision != "fp32" else 4
    d = m.hidden_size
    # The busiest stage's layers (uneven stages: parallel.first/last_stage_layers).
    layers_per_stage = (
        max(
            stage_layers(
                m.num_layers, layout.pipeline, layout.first_stage_layers, layout.last_stage_layers
            )
        )
        if layout.first_stage_layers or layout.last_stage_layers
        else m.num_layers / layout.pipeline
    )
    moe_share = sum(m.moe_layer_pattern) / m.num_layers
    # tokens one rank processes per step (all its micro-batches), after CP
    rank_tokens = micro * layout.micro_batch_size * m.seq_length / layout.context
    ep_comm = 0.0
    if moe is not None and layout.expert > 1:
        ep = layout.expert
        per_layer = 4 * rank_tokens * moe.top_k * d * B * (ep - 1) / ep / layout.tensor
        bw = hw.bandwidth(ep, layout.expert_tensor_size)
        ep_comm = per_layer * layers_per_stage * moe_share / bw
    tp_comm = 0.0
    if layout.tensor > 1:
        t = layout.tensor
        per_layer = 8 * rank_tokens * d * B * (t - 1) / t
        tp_comm = per_layer * layers_per_stage / hw.bandwidth(t, 1)
    dp_comm = _dp_time(cfg, layout, vocab, hw)
    return StepTime(compute, bubble, ep_comm, tp_comm, dp_comm)


def _dp_time(cfg: RunConfig, layout: Layout, vocab: int, hw: Hardware) -> float:
    from .memory import static_memory

    st = static_memory(cfg.model, layout, vocab, 0)
    # gradients move once (reduce-scatter or all-reduce halves) + weights (all-gather)
    wbytes = 2 if layout.precision != "fp32" else 4
    grad_bytes = st["numel"] * 4
    moved = grad_bytes + st["numel"] * wbytes if layout.distributed_optimizer else 2 * grad_bytes
    group = layout.data * layout.context
    if group <= 1 and layout.expert_data <= 1:
        return 0.0
    g = max(group, layout.expert_data)
    stride = layout.tensor * layout.context  # Megatron's order: tp-cp-ep-dp-pp
    return moved * (g - 1) / g / hw.bandwidth(g, stride)
