"""Layer specs: which Megatron module fills each slot of a transformer layer.

The decoder block comes from Megatron's own GPT block spec (dense and MoE layers mixed by
``moe_layer_freq``). On the local (no Transformer Engine) path the norms are swapped for
``SequenceParallelNorm`` so that tensor + sequence parallelism work; on GPUs with Transformer
Engine, its fused norm+linear spec is used unchanged (FP8 needs it). New routers and expert
kinds plug in here as a new spec entry, not as an edited transformer.
"""

from __future__ import annotations

from dataclasses import replace

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from .norm import SequenceParallelNorm


def decoder_block_spec(
    config: TransformerConfig, use_transformer_engine: bool, vp_stage: int | None
) -> TransformerBlockSubmodules:
    block = get_gpt_decoder_block_spec(
        config,
        use_transformer_engine=use_transformer_engine,
        normalization=config.normalization,
        vp_stage=vp_stage,
    )
    if use_transformer_engine:
        return block
    return TransformerBlockSubmodules(
        layer_specs=[_with_local_norms(spec) for spec in block.layer_specs],
        layer_norm=SequenceParallelNorm,
    )


def _with_local_norms(layer: ModuleSpec) -> ModuleSpec:
    sub = replace(
        layer.submodules,
        input_layernorm=SequenceParallelNorm,
        pre_mlp_layernorm=SequenceParallelNorm,
    )
    return replace(layer, submodules=sub)
