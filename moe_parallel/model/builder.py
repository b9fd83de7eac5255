"""Build the GPT-MoE model chunks of this rank from the run config.

One chunk per virtual pipeline stage (one when interleaving is off). The chunks are plain
Megatron ``GPTModel``s; data parallelism is applied from outside (train/setup.py).
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from ..config import RunConfig
from . import megatron_fixes
from .init import init_layout_invariant
from .output_bias import add_output_layer_bias
from .routers import noise
from .specs import LayerChoices, decoder_block_spec, multi_token_prediction_spec
from .trainable import apply_trainable


def build_model_chunks(
    cfg: RunConfig, tconfig: TransformerConfig, vocab_size: int, use_transformer_engine: bool
) -> list[GPTModel]:
    megatron_fixes.apply()
    noise.set_seed(cfg.train.seed)  # stochastic routers' draws (routers/noise.py)
    vpp = cfg.parallel.virtual_pipeline
    chunks = []
    for vp_stage in range(vpp or 1):
        stage = vp_stage if vpp else None
        chunks.append(_build_chunk(cfg, tconfig, vocab_size, use_transformer_engine, stage))
    # Weights depend only on the seed and each tensor's global name, not on the layout: the
    # same config trains the same model on 1 rank or 64 (and layouts can be compared).
    for chunk in chunks:
        init_layout_invariant(chunk, seed=cfg.train.seed, config=tconfig)
    apply_trainable(chunks, cfg.train.trainable)  # PESC: only adapters and routers train
    megatron_fixes.mark_expert_parameters(chunks, tconfig)  # ETP != TP without EP
    return chunks


def _build_chunk(cfg, tconfig, vocab_size, use_te, vp_stage) -> GPTModel:
    m = cfg.model
    block = decoder_block_spec(tconfig, use_te, vp_stage, LayerChoices.from_model(m))
    model = GPTModel(
        config=tconfig,
        transformer_layer_spec=block,
        mtp_block_spec=multi_token_prediction_spec(tconfig, block, use_te, vp_stage),
        vocab_size=vocab_size,
        max_sequence_length=m.max_position_embeddings or m.seq_length,
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
        share_embeddings_and_output_weights=m.tie_embeddings,
        position_embedding_type=m.position_embedding,
        rotary_percent=m.rotary_percent,
        rotary_base=int(m.rotary_base),
        vp_stage=vp_stage,
    )
    if m.output_layer_bias:
        add_output_layer_bias(model)
    if torch.cuda.is_available() and not tconfig.use_cpu_initialization:
        model.cuda(torch.cuda.current_device())
    return model


def count_parameters(chunks: list[GPTModel]) -> int:
    """Parameters held by this rank (shared/replicated ones counted once per rank)."""
    return sum(p.numel() for chunk in chunks for p in chunk.parameters())
