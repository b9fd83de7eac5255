"""The one place where our config becomes Megatron-core's configs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.distributed import DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig
from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

from .schema import RunConfig

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_ACTIVATIONS = {"swiglu": F.silu, "gelu": F.gelu, "relu": F.relu}
# Our load-balancing names -> Megatron's (global_aux_loss balances over the DP group, as GRIN does).
_BALANCING = {
    "aux_loss": "aux_loss",
    "seq_aux_loss": "seq_aux_loss",
    "global_aux_loss": "global_aux_loss",
    "none": "none",
}


def transformer_config(cfg: RunConfig, on_cpu: bool) -> TransformerConfig:
    kwargs = transformer_config_kwargs(cfg, on_cpu)
    if cfg.model.attention == "mla":
        return MLATransformerConfig(**kwargs)
    return TransformerConfig(**kwargs)


def transformer_config_kwargs(cfg: RunConfig, on_cpu: bool) -> dict:
    """The fields this config sets on Megatron's ``TransformerConfig`` (the rest keep Megatron's
    defaults). Apart so that a GPU run's fields can be read where ``TransformerConfig`` itself
    cannot be built: with MoE and FP8 its checks ask Transformer Engine for its version."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    dtype = _DTYPES[t.precision]
    kwargs = dict(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        kv_channels=m.kv_channels,
        normalization=m.normalization,
        layernorm_epsilon=m.norm_epsilon,
        activation_func=_ACTIVATIONS[m.activation],
        gated_linear_unit=m.activation == "swiglu",
        add_bias_linear=m.add_bias_linear,
        add_qkv_bias=m.add_qkv_bias,
        init_method_std=m.init_method_std,
        hidden_dropout=m.hidden_dropout,
        attention_dropout=m.attention_dropout,
        # Megatron's qk_layernorm is per head; the projection-wide norm is our own module
        # (model/norm.py), placed by the layer spec.
        qk_layernorm=m.qk_norm and m.qk_norm_scope == "head",
        # layout
        tensor_model_parallel_size=p.tensor,
        pipeline_model_parallel_size=p.pipeline,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline,
        num_layers_in_first_pipeline_stage=p.first_stage_layers,
        num_layers_in_last_pipeline_stage=p.last_stage_layers,
        context_parallel_size=p.context,
        # PEER alone shards its tables over EP itself; Megatron's EP is for MoE layers.
        expert_model_parallel_size=p.expert if m.moe is not None else 1,
        expert_tensor_parallel_size=p.expert_tensor_size,
        sequence_parallel=p.sequence_parallel,
        # precision
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=t.precision == "bf16",
        fp16=t.precision == "fp16",
        fp8=t.fp8,
        fp8_recipe=t.fp8_recipe if t.fp8 else "delayed",
        # Loss averaged per token over the whole global batch: the same number whatever the
        # data-parallel size or micro-batch count, which is what makes layouts comparable.
        calculate_per_token_loss=True,
        use_cpu_initialization=on_cpu,
        perform_initialization=True,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        deallocate_pipeline_outputs=True,
        **_recompute_kwargs(t.recompute),
    )
    if m.moe is not None:
        kwargs.update(_moe_kwargs(cfg))
    if m.latent_attention is not None:
        kwargs.update(_latent_attention_kwargs(m))
    if m.mtp_layers:
        kwargs["mtp_num_layers"] = m.mtp_layers
        if m.mtp_loss_weight is not None:
            kwargs["mtp_loss_scaling_factor"] = m.mtp_loss_weight
    if m.peer is not None:  # PEER layers differ from the others: checkpoint keys per layer
        kwargs["hetereogenous_dist_checkpoint"] = True
    return kwargs


def _latent_attention_kwargs(m) -> dict:
    """MLATransformerConfig's fields. The core attention writes kv_channels per head, which must
    be the values' head size; the latents' norms are Megatron's qk_layernorm (DeepSeek always
    normalises both latents)."""
    mla = m.latent_attention
    yarn = {
        name: getattr(mla, name)
        for name in (
            "rotary_scaling_factor",
            "original_max_position_embeddings",
            "beta_fast",
            "beta_slow",
            "mscale",
            "mscale_all_dim",
        )
        if getattr(mla, name) is not None
    }
    return dict(
        multi_latent_attention=True,
        q_lora_rank=mla.q_lora_rank,
        kv_lora_rank=mla.kv_lora_rank,
        qk_head_dim=mla.qk_head_dim,
        qk_pos_emb_head_dim=mla.qk_pos_emb_head_dim,
        v_head_dim=mla.v_head_dim,
        kv_channels=mla.v_head_dim,
        num_query_groups=None,
        qk_layernorm=True,
        rope_type=mla.rope_type,
        rotary_base=m.rotary_base,
        rotary_percent=m.rotary_percent,
        **yarn,
    )


def _recompute_kwargs(recompute: str) -> dict:
    if recompute == "full":
        return dict(
            recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1
        )
    if recompute == "selective":
        return dict(recompute_granularity="selective", recompute_modules=["core_attn"])
    return {}


def _moe_kwargs(cfg: RunConfig) -> dict:
    moe = cfg.model.moe
    assert moe is not None
    return (
        dict(
            num_moe_experts=moe.num_experts,
            moe_router_topk=moe.top_k,
            moe_ffn_hidden_size=moe.expert_ffn_hidden_size,
            moe_shared_expert_intermediate_size=moe.shared_expert_ffn_hidden_size,
            moe_shared_expert_gate=moe.shared_expert_gate,
            moe_layer_freq=cfg.model.moe_layer_pattern,
            moe_router_score_function=moe.score_function,
            moe_router_enable_expert_bias=moe.expert_bias,
            moe_router_topk_scaling_factor=moe.routed_scaling_factor,
            moe_router_num_groups=moe.num_groups,
            moe_router_group_topk=moe.group_topk,
            moe_router_pre_softmax=moe.pre_softmax,
            moe_router_load_balancing_type=_BALANCING[moe.load_balancing],
            moe_aux_loss_coeff=moe.aux_loss_coeff if moe.load_balancing != "none" else 0.0,
            moe_z_loss_coeff=moe.z_loss_coeff,
            moe_token_dispatcher_type=moe.dispatcher,
            moe_expert_capacity_factor=moe.capacity_factor,
            moe_pad_expert_input_to_capacity=moe.capacity_factor is not None
            and moe.pad_to_capacity,
            moe_grouped_gemm=moe.grouped_gemm,
            moe_router_dtype=moe.router_dtype,
            moe_permute_fusion=False,
            moe_input_jitter_eps=moe.input_jitter_eps,
        )
        | _finetune_router_losses(cfg)
        | _bias_update_rate(moe)
    )


def _bias_update_rate(moe) -> dict:
    """The expert bias's update rate when the config sets one (else Megatron's default)."""
    rate = moe.expert_bias_update_rate
    return {} if rate is None else {"moe_router_bias_update_rate": rate}


def _finetune_router_losses(cfg: RunConfig) -> dict:
    """finetune.aux_loss / z_loss = false switch the router's losses off while finetuning."""
    ft, off = cfg.finetune, {}
    if ft is not None and not ft.aux_loss:
        off["moe_aux_loss_coeff"] = 0.0
    if ft is not None and not ft.z_loss:
        off["moe_z_loss_coeff"] = None
    return off


def optimizer_config(cfg: RunConfig) -> OptimizerConfig:
    t = cfg.train
    return OptimizerConfig(
        optimizer="adam",
        lr=t.lr,
        min_lr=t.min_lr,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        adam_eps=t.adam_eps,
        clip_grad=t.clip_grad,
        bf16=t.precision == "bf16",
        fp16=t.precision == "fp16",
        params_dtype=_DTYPES[t.precision],
        use_distributed_optimizer=cfg.parallel.distributed_optimizer,
    )


def ddp_config(cfg: RunConfig) -> DistributedDataParallelConfig:
    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=cfg.parallel.distributed_optimizer,
        check_for_nan_in_grad=True,
        # Per-token loss: gradients are summed over DP and divided by the global token count.
        average_in_collective=False,
    )
