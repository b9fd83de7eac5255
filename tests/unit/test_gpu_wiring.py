"""GPU branches checked on CPU where that needs no pretending (nothing stands in for a GPU or
for Transformer Engine, which is not installed here and is never imported):

- the Megatron fields an FP8 GPU run gets (``config/megatron.py``), read from the arguments our
  config gives ``TransformerConfig`` plus Megatron's defaults for the rest; a dense FP8 config is
  also built into a real ``TransformerConfig`` (a MoE one asks TE for its version there);
- the spec: which module classes our code puts in the slots of Megatron's TE layer spec, by
  name (Megatron's TE block itself cannot be built without TE, so its own slots ride on the
  local block here and are checked to pass through untouched);
- NCCL's set-up: the backend and the GPU a rank drives.

What stays unverified until a GPU runs it is listed in docs/gpus.md.
"""

from __future__ import annotations

import dataclasses
import sys

import pytest
import torch

from tests.conftest import REPO

TINY = REPO / "configs" / "tiny"


def megatron_fields(cfg, on_cpu: bool) -> dict:
    """Every TransformerConfig field as the run gets it: ours, else Megatron's default."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    from moe_parallel.config.megatron import transformer_config_kwargs

    ours = transformer_config_kwargs(cfg, on_cpu=on_cpu)
    fields = {f.name: f for f in dataclasses.fields(TransformerConfig)}
    assert set(ours) <= set(fields), set(ours) - set(fields)
    return {
        name: ours[name] if name in ours else f.default
        for name, f in fields.items()
        if f.default is not dataclasses.MISSING
    }


# The FP8 fields a GPU run gets with train.fp8=hybrid (our config sets fp8 and fp8_recipe; the
# scaling knobs are Megatron-core 0.16.1's TransformerConfig defaults).
FP8_HYBRID = {
    "fp8": "hybrid",
    "fp8_recipe": "delayed",
    "fp8_margin": 0,
    "fp8_interval": 1,
    "fp8_amax_history_len": 1,
    "fp8_amax_compute_algo": "most_recent",
    "fp8_wgrad": True,
    "fp8_param": False,
    "fp8_dot_product_attention": False,
    "fp8_multi_head_attention": False,
    "bf16": True,
    "fp16": False,
    "params_dtype": torch.bfloat16,
    "pipeline_dtype": torch.bfloat16,
    "use_cpu_initialization": False,
    "gradient_accumulation_fusion": False,
    "bias_activation_fusion": False,
    "masked_softmax_fusion": False,
    "bias_dropout_fusion": False,
    "apply_rope_fusion": False,
}


def test_an_fp8_hybrid_moe_run_on_gpus_gets_these_megatron_fields():
    from moe_parallel.config import load_config

    cfg = load_config(
        TINY / "moe_tiny.yaml",
        ["train.precision=bf16", "train.fp8=hybrid", "model.moe.grouped_gemm=true"],
    )
    got = megatron_fields(cfg, on_cpu=False)
    assert {k: got[k] for k in FP8_HYBRID} == FP8_HYBRID
    # The TE grouped-MLP options: Megatron's TE spec takes TEGroupedMLP for these (TE >= 1.9).
    assert (got["moe_grouped_gemm"], got["moe_use_legacy_grouped_gemm"]) == (True, False)
    assert (got["moe_permute_fusion"], got["moe_router_fusion"]) == (False, False)
    assert (got["num_moe_experts"], got["moe_router_topk"]) == (4, 2)
    assert got["moe_router_padding_for_quantization"] is False


def test_e4m3_tensorwise_and_no_fp8_translate_field_for_field():
    from moe_parallel.config import load_config

    e4m3 = load_config(
        TINY / "moe_tiny.yaml",
        ["train.precision=bf16", "train.fp8=e4m3", "train.fp8_recipe=tensorwise"],
    )
    got = megatron_fields(e4m3, on_cpu=False)
    assert (got["fp8"], got["fp8_recipe"], got["moe_grouped_gemm"]) == ("e4m3", "tensorwise", False)
    plain = megatron_fields(load_config(TINY / "moe_tiny.yaml"), on_cpu=True)
    assert (plain["fp8"], plain["fp8_recipe"], plain["params_dtype"]) == (
        None,
        "delayed",
        torch.float32,
    )
    assert plain["use_cpu_initialization"] is True


def test_a_dense_fp8_config_builds_into_megatrons_config_with_those_fields():
    """Without MoE, TransformerConfig's checks do not ask for TE: the real object, post-init."""
    from moe_parallel.config import load_config
    from moe_parallel.config.megatron import optimizer_config, transformer_config

    cfg = load_config(TINY / "dense_tiny.yaml", ["train.precision=bf16", "train.fp8=hybrid"])
    built = transformer_config(cfg, on_cpu=False)
    assert {k: getattr(built, k) for k in FP8_HYBRID} == FP8_HYBRID
    opt = optimizer_config(cfg)
    assert (opt.bf16, opt.fp16, opt.params_dtype) == (True, False, torch.bfloat16)
    assert "transformer_engine" not in sys.modules


def _block(config_name: str, use_te: bool):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    from moe_parallel.config import load_config
    from moe_parallel.config.megatron import transformer_config
    from moe_parallel.model.specs import LayerChoices, with_layer_choices

    cfg = load_config(TINY / config_name)
    tconfig = transformer_config(cfg, on_cpu=True)
    megatron = get_gpt_decoder_block_spec(
        tconfig, use_transformer_engine=False, normalization=tconfig.normalization, pp_rank=0
    )
    ours = with_layer_choices(megatron, tconfig, use_te, None, LayerChoices.from_model(cfg.model))
    return megatron, ours


def _names(layer) -> dict:
    sub = layer.submodules
    return {
        "input_layernorm": sub.input_layernorm.__name__,
        "linear_qkv": sub.self_attention.submodules.linear_qkv.__name__,
        "pre_mlp_layernorm": sub.pre_mlp_layernorm.__name__,
        "mlp": sub.mlp.module.__name__,
    }


def test_lfa_on_the_transformer_engine_spec_takes_te_norm_in_front_of_its_projection():
    """TE fuses the input norm into linear_qkv (TELayerNormColumnParallelLinear); LFA replaces
    that linear, so the norm comes back apart as TENorm. Other slots stay Megatron's."""
    megatron, ours = _block("yuan2_m32_tiny.yaml", use_te=True)
    for theirs, layer in zip(megatron.layer_specs, ours.layer_specs, strict=True):
        assert _names(layer) == {
            "input_layernorm": "TENorm",
            "linear_qkv": "LocalizedFilteringQKV",
            "pre_mlp_layernorm": theirs.submodules.pre_mlp_layernorm.__name__,
            "mlp": "MoELayer",
        }
        attention = layer.submodules.self_attention.submodules
        assert (
            attention.core_attention is theirs.submodules.self_attention.submodules.core_attention
        )
        assert attention.linear_proj is theirs.submodules.self_attention.submodules.linear_proj
    assert ours.layer_norm is megatron.layer_norm  # the TE block keeps its own final norm
    assert "transformer_engine" not in sys.modules


def test_peer_on_the_transformer_engine_spec_takes_te_norm_in_front_of_its_layer():
    """TE fuses the pre-MLP norm into linear_fc1; PEER has none, so its layers get TENorm."""
    megatron, ours = _block("peer_tiny.yaml", use_te=True)
    names = [_names(layer) for layer in ours.layer_specs]
    assert [n["mlp"] for n in names] == ["MLP", "MLP", "PeerLayer", "MLP"]  # peer.layers: [2]
    assert names[2]["pre_mlp_layernorm"] == "TENorm"
    for i in (0, 1, 3):
        assert ours.layer_specs[i] == megatron.layer_specs[i]
    assert "transformer_engine" not in sys.modules


def test_the_local_spec_puts_sequence_parallel_norms_in_every_norm_slot():
    _, ours = _block("peer_tiny.yaml", use_te=False)
    for layer in ours.layer_specs:
        names = _names(layer)
        assert (names["input_layernorm"], names["pre_mlp_layernorm"]) == (
            "SequenceParallelNorm",
            "SequenceParallelNorm",
        )
    assert ours.layer_norm.__name__ == "SequenceParallelNorm"


def test_gpu_ranks_join_over_nccl_and_each_drives_its_local_gpu():
    from moe_parallel.runtime.distributed import gpu_of_local_rank, process_group_backend

    assert (process_group_backend("cuda"), process_group_backend("cpu")) == ("nccl", "gloo")
    assert [gpu_of_local_rank(r, 8) for r in range(8)] == list(range(8))  # local, SLURM
    assert [gpu_of_local_rank(r, 1) for r in range(4)] == [0, 0, 0, 0]  # Ray: one GPU per actor
    with pytest.raises(RuntimeError, match=r"local rank 3 is a GPU rank but sees no GPU"):
        gpu_of_local_rank(3, 0)
    with pytest.raises(ValueError, match=r"device='tpu': allowed values are 'cpu' or 'cuda'"):
        process_group_backend("tpu")
