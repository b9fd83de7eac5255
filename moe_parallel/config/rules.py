"""Cross-field rules of a run config, and the checks that need to know where it will run.

Each rule raises ``ValueError`` with the field(s), the value(s) and what is allowed, so that a
bad layout is refused before any job starts rather than deep inside Megatron's mesh setup.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .schema import RunConfig


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_run(cfg: "RunConfig") -> None:
    for rule in (
        _attention_heads,
        _pipeline,
        _experts,
        _sequence_parallel,
        _batch,
        _precision,
        _lr,
        _evaluation,
        _model_modules,
    ):
        rule(cfg)


def _model_modules(cfg: "RunConfig") -> None:
    m, p = cfg.model, cfg.parallel
    if m.attention == "mla" and p.tensor > 1 and not p.sequence_parallel:
        # Megatron sums the query latent norm's gradient over the tensor-parallel ranks (by its
        # name, q_layernorm); without SP each rank already holds the whole gradient.
        raise ValueError(
            f"model.attention=mla with parallel.tensor={p.tensor} needs "
            "parallel.sequence_parallel=true"
        )
    if m.attention == "lfa" and p.tensor > 1 and not p.sequence_parallel:
        raise ValueError(
            f"model.attention=lfa with parallel.tensor={p.tensor} needs "
            "parallel.sequence_parallel=true (the filter's gradients are reduced "
            "over the tensor-parallel group with the sequence-parallel ones)"
        )
    router = m.moe.router if m.moe else "topk"
    if router == "sparsemixer" and p.context > 1:
        raise ValueError(
            f"model.moe.router=sparsemixer needs parallel.context=1 (its sampling "
            f"is keyed by token position); got parallel.context={p.context}"
        )
    if router == "sparsemixer" and cfg.train.recompute == "full":
        # Full recompute re-runs the router in backward, after later micro-batches' forwards:
        # its draws would be keyed to the wrong samples.
        raise ValueError(
            "model.moe.router=sparsemixer cannot be used with train.recompute=full "
            "(allowed: none, selective)"
        )
    if m.mod is not None and (p.sequence_parallel or p.context > 1):
        # Top-k over a sequence needs all of it (model/layers/mixture_of_depths.py).
        raise ValueError(
            f"model.mod (Mixture-of-Depths) needs the whole sequence on each rank: "
            f"parallel.sequence_parallel=false and parallel.context=1 (got "
            f"{p.sequence_parallel} and {p.context}); tensor parallelism without "
            "sequence parallelism works for dense models"
        )
    if router == "attention" and m.add_bias_linear:
        raise ValueError("model.moe.router=attention has no bias: set model.add_bias_linear=false")
    _adapter_experts(cfg)


def _adapter_experts(cfg: "RunConfig") -> None:
    """PESC's adapter experts (model/layers/adapter_experts.py) and its adapter-only tuning."""
    moe, p, t = cfg.model.moe, cfg.parallel, cfg.train
    adapters = moe is not None and moe.expert_kind == "adapter"
    if t.trainable == "adapters_and_routers" and not adapters:
        raise ValueError(
            "train.trainable=adapters_and_routers needs adapter experts "
            "(model.moe.expert_kind=adapter); allowed otherwise: all"
        )
    if t.trainable == "adapters_and_routers" and t.recompute == "full":
        # Megatron's reentrant checkpoint gives no gradient to a layer whose input does not
        # require one (the frozen embedding's output), so layer 0's adapters would not train.
        raise ValueError(
            "train.trainable=adapters_and_routers cannot be used with "
            "train.recompute=full (allowed: none, selective)"
        )
    if adapters and moe.adapter_dim % p.expert_tensor_size:
        raise ValueError(
            f"model.moe.adapter_dim={moe.adapter_dim} is not divisible by the expert "
            f"tensor-parallel size {p.expert_tensor_size} (parallel.expert_tensor)"
        )


def _evaluation(cfg: "RunConfig") -> None:
    valid_share = float(cfg.data.split.split(",")[1])
    if cfg.train.eval_interval is not None and valid_share == 0:
        raise ValueError(
            f"train.eval_interval={cfg.train.eval_interval} needs a validation share "
            f"in data.split (got {cfg.data.split!r}; e.g. '98,2,0')"
        )


def _attention_heads(cfg: "RunConfig") -> None:
    m, tp = cfg.model, cfg.parallel.tensor
    if m.num_attention_heads % tp:
        raise ValueError(
            f"model.num_attention_heads={m.num_attention_heads} is not divisible by "
            f"parallel.tensor={tp}; allowed tensor sizes: {_divisors(m.num_attention_heads)}"
        )
    groups = m.num_query_groups or m.num_attention_heads
    if groups % tp:
        raise ValueError(
            f"model.num_query_groups={groups} is not divisible by parallel.tensor={tp}; "
            f"allowed tensor sizes: {_divisors(groups)}"
        )
    if m.ffn_hidden_size % tp:
        raise ValueError(
            f"model.ffn_hidden_size={m.ffn_hidden_size} is not divisible by parallel.tensor={tp}"
        )


def _pipeline(cfg: "RunConfig") -> None:
    p = cfg.parallel
    if p.first_stage_layers is not None or p.last_stage_layers is not None:
        _uneven_pipeline(cfg)
        return
    stages = p.pipeline * (p.virtual_pipeline or 1)
    if cfg.model.num_layers % stages:
        what = "parallel.pipeline" + (" x parallel.virtual_pipeline" if p.virtual_pipeline else "")
        raise ValueError(
            f"model.num_layers={cfg.model.num_layers} is not divisible by {what}={stages}; "
            f"allowed stage counts: {_divisors(cfg.model.num_layers)}"
        )
    if p.virtual_pipeline is not None and p.pipeline == 1:
        raise ValueError(
            f"parallel.virtual_pipeline={p.virtual_pipeline} needs parallel.pipeline > 1 "
            "(interleaving splits each pipeline rank's layers into chunks)"
        )


def _uneven_pipeline(cfg: "RunConfig") -> None:
    """Megatron's rule for num_layers_in_first/last_pipeline_stage: the layers left after the
    set ends divide evenly over the stages in between."""
    p, layers = cfg.parallel, cfg.model.num_layers
    fields = "parallel.first_stage_layers / last_stage_layers"
    if p.pipeline == 1 or p.virtual_pipeline is not None:
        raise ValueError(
            f"{fields} need parallel.pipeline > 1 and no parallel.virtual_pipeline "
            f"(got pipeline={p.pipeline}, virtual_pipeline={p.virtual_pipeline})"
        )
    ends = (p.first_stage_layers or 0) + (p.last_stage_layers or 0)
    middle = p.pipeline - (p.first_stage_layers is not None) - (p.last_stage_layers is not None)
    rest = layers - ends
    if rest < middle or (middle == 0 and rest != 0) or (middle and rest % middle):
        raise ValueError(
            f"{fields} = {p.first_stage_layers} / {p.last_stage_layers} leave {rest} of "
            f"model.num_layers={layers} for the {middle} other stages of parallel.pipeline="
            f"{p.pipeline}: they must divide evenly, at least one layer each"
        )


def stage_layers(num_layers: int, pipeline: int, first: int | None, last: int | None) -> list[int]:
    """Layers per pipeline stage (even, or with the first / last stage's count set)."""
    if first is None and last is None:
        return [num_layers // pipeline] * pipeline
    middle = pipeline - (first is not None) - (last is not None)
    each = (num_layers - (first or 0) - (last or 0)) // middle if middle else 0
    counts = [each] * pipeline
    if first is not None:
        counts[0] = first
    if last is not None:
        counts[-1] = last
    return counts


def _experts(cfg: "RunConfig") -> None:
    p, moe = cfg.parallel, cfg.model.moe
    if moe is None:
        if p.expert > 1 and cfg.model.peer is None:
            raise ValueError(
                f"parallel.expert={p.expert} needs model.moe or model.peer (the model "
                "has no experts)"
            )
        _peer_layout(cfg)
        return
    _peer_layout(cfg)
    if moe.num_experts % p.expert:
        raise ValueError(
            f"model.moe.num_experts={moe.num_experts} is not divisible by parallel.expert="
            f"{p.expert}; allowed expert-parallel sizes: {_divisors(moe.num_experts)}"
        )
    # Megatron carves expert groups (EP x ETP) out of the ranks of one pipeline stage.
    ranks_per_stage = p.tensor * p.context * p.data
    expert_ranks = p.expert * p.expert_tensor_size
    if ranks_per_stage % expert_ranks:
        raise ValueError(
            f"parallel.expert={p.expert} x expert_tensor={p.expert_tensor_size} = {expert_ranks} "
            f"does not divide the {ranks_per_stage} ranks of a pipeline stage "
            f"(tensor x context x data = {p.tensor} x {p.context} x {p.data})"
        )
    if moe.capacity_factor is not None and moe.dispatcher != "alltoall":
        raise ValueError(
            f"model.moe.capacity_factor={moe.capacity_factor} only works with "
            f"model.moe.dispatcher='alltoall' (got {moe.dispatcher!r}); set capacity_factor: null"
            " for dropless routing"
        )
    if moe.expert_ffn_hidden_size % p.expert_tensor_size:
        raise ValueError(
            f"model.moe.expert_ffn_hidden_size={moe.expert_ffn_hidden_size} is not divisible by "
            f"the expert tensor size {p.expert_tensor_size}"
        )


def _peer_layout(cfg: "RunConfig") -> None:
    peer, p = cfg.model.peer, cfg.parallel
    if peer is None:
        return
    if peer.num_experts % p.expert:
        raise ValueError(
            f"model.peer.num_experts={peer.num_experts} is not divisible by "
            f"parallel.expert={p.expert} (each rank holds N/EP table rows)"
        )
    if p.tensor > 1 or p.context > 1:
        # The query BatchNorm needs the whole micro-batch's tokens on one rank.
        raise ValueError(
            f"model.peer needs parallel.tensor=1 and parallel.context=1 (got "
            f"{p.tensor} and {p.context}): use data, expert and pipeline parallelism"
        )
    if p.expert > 1 and (p.tensor * p.context * p.data) % p.expert:
        raise ValueError(
            f"parallel.expert={p.expert} does not divide the ranks of a pipeline "
            f"stage (data={p.data})"
        )


def _sequence_parallel(cfg: "RunConfig") -> None:
    p = cfg.parallel
    if cfg.model.moe is not None and p.tensor > 1 and not p.sequence_parallel:
        raise ValueError(
            f"MoE with parallel.tensor={p.tensor} requires parallel.sequence_parallel: true "
            "(Megatron's MoE layer expects sequence-parallel input under tensor parallelism)"
        )
    if p.sequence_parallel and p.tensor == 1:
        raise ValueError("parallel.sequence_parallel: true needs parallel.tensor > 1")
    if p.sequence_parallel and cfg.model.seq_length % p.tensor:
        raise ValueError(
            f"model.seq_length={cfg.model.seq_length} is not divisible by parallel.tensor="
            f"{p.tensor}, which sequence parallelism requires"
        )


def _batch(cfg: "RunConfig") -> None:
    t, dp = cfg.train, cfg.parallel.data
    per_step = t.micro_batch_size * dp
    if t.global_batch_size % per_step:
        raise ValueError(
            f"train.global_batch_size={t.global_batch_size} is not divisible by "
            f"train.micro_batch_size x parallel.data = {t.micro_batch_size} x {dp} = {per_step}"
        )
    p = cfg.parallel
    if p.virtual_pipeline and cfg.num_microbatches % p.pipeline:
        raise ValueError(
            f"interleaved pipelining needs the number of micro-batches ({cfg.num_microbatches}) to "
            f"be a multiple of parallel.pipeline={p.pipeline}"
        )


def _precision(cfg: "RunConfig") -> None:
    t = cfg.train
    if t.fp8 is not None:
        if t.device == "cpu":
            raise ValueError(
                f"train.fp8={t.fp8!r} cannot run with train.device='cpu': FP8 needs Transformer "
                "Engine on Hopper-class GPUs; set train.fp8: null"
            )
        if t.precision == "fp32":
            raise ValueError(
                f"train.fp8={t.fp8!r} needs train.precision 'bf16' or 'fp16' (got 'fp32')"
            )
    if t.device == "cpu" and t.precision == "fp16":
        raise ValueError(
            "train.precision='fp16' is not supported with train.device='cpu'; use 'fp32' or 'bf16'"
        )


def _lr(cfg: "RunConfig") -> None:
    t = cfg.train
    if t.min_lr > t.lr:
        raise ValueError(f"train.min_lr={t.min_lr} is larger than train.lr={t.lr}")
    decay = t.lr_decay_steps or t.steps
    if t.warmup_steps >= decay:
        raise ValueError(
            f"train.warmup_steps={t.warmup_steps} must be shorter than the decay ({decay} steps: "
            "train.lr_decay_steps, or train.steps when unset)"
        )


def resolve_device(cfg: "RunConfig", cuda_available: bool) -> str:
    """'cpu' or 'cuda' for this machine; refuses what cannot run here."""
    want = cfg.train.device
    if want == "cuda" and not cuda_available:
        raise ValueError(
            "train.device='cuda' but this machine has no CUDA GPU; use 'cpu' or 'auto'"
        )
    device = "cuda" if (want == "cuda" or (want == "auto" and cuda_available)) else "cpu"
    if cfg.train.fp8 is not None:
        if device == "cpu":
            raise ValueError(
                f"train.fp8={cfg.train.fp8!r} asked for, but the run would be on CPU; FP8 needs "
                "Transformer Engine on GPUs: set train.fp8: null"
            )
        if importlib.util.find_spec("transformer_engine") is None:
            raise ValueError(
                f"train.fp8={cfg.train.fp8!r} needs Transformer Engine, which is not installed: "
                "pip install 'moe-parallel[gpu]' on the GPU nodes, or set train.fp8: null"
            )
    check_device_support(cfg, device)
    return device


def uses_transformer_engine(cfg: "RunConfig", device: str) -> bool:
    """Whether the model is built from Transformer Engine's layer spec: on GPU ranks that have
    it, unless finetuning's per-example attention asks for Megatron's local attention (TE's
    causal attention ignores an explicit mask). CPU ranks never use it."""
    if device != "cuda" or importlib.util.find_spec("transformer_engine") is None:
        return False
    return cfg.finetune is None or cfg.finetune.attention != "per_example"


def check_device_support(cfg: "RunConfig", device: str) -> None:
    """Options that cannot run on the ranks' device, refused with the reason (rather than by an
    assertion inside Megatron's model build). Megatron-core 0.16.1: its local attention
    (``DotProductAttention``) asserts context_parallel_size == 1, only ``TEDotProductAttention``
    splits the sequence; grouped GEMM is ``TEGroupedMLP`` (Transformer Engine) or the legacy
    ``GroupedMLP``, which calls the grouped_gemm package's CUDA kernels."""
    p, moe = cfg.parallel, cfg.model.moe
    if device == "cpu" and cfg.train.precision == "fp16":  # train.device=auto on a CPU machine
        raise ValueError(
            "train.precision='fp16' does not run on CPU ranks (the first step's gradients are "
            "NaN); use 'fp32' or 'bf16'"
        )
    te = uses_transformer_engine(cfg, device)
    if p.context > 1 and not te:
        if device == "cpu":
            raise ValueError(
                f"parallel.context={p.context} needs Transformer Engine's attention on GPUs; "
                "on CPU ranks use parallel.context=1"
            )
        raise ValueError(
            f"parallel.context={p.context} needs Transformer Engine's attention, which is not "
            "installed: pip install 'moe-parallel[gpu]' on the GPU nodes, or use "
            "parallel.context=1"
        )
    if moe is None or not moe.grouped_gemm:
        return
    if device == "cpu":
        raise ValueError(
            "model.moe.grouped_gemm=true needs CUDA grouped-GEMM kernels (Transformer Engine "
            "or the grouped_gemm package) on GPUs; on CPU ranks use model.moe.grouped_gemm=false"
        )
    if not te and importlib.util.find_spec("grouped_gemm") is None:
        raise ValueError(
            "model.moe.grouped_gemm=true needs Transformer Engine or the grouped_gemm package, "
            "and neither is installed: pip install 'moe-parallel[gpu]' on the GPU nodes, or "
            "set model.moe.grouped_gemm=false"
        )


def check_world_size(cfg: "RunConfig", world_size: int) -> None:
    p = cfg.parallel
    if world_size != p.world_size:
        raise ValueError(
            f"the launch has {world_size} ranks but parallel.tensor x pipeline x context x data = "
            f"{p.tensor} x {p.pipeline} x {p.context} x {p.data} = {p.world_size}; "
            "change parallel.data (or the layout) so that the product equals the rank count"
        )
