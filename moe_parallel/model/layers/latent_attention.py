"""Multi-head latent attention (DeepSeek-V2, arXiv 2405.04434 section 2.1) on the local path.

Megatron-core 0.16.1 has MLA (``MLASelfAttention``) and a local spec for it, but its local core
attention, ``DotProductAttention``, does not take the ``k_channels`` / ``v_channels`` that MLA
passes (queries and keys of ``qk_head_dim + qk_pos_emb_head_dim`` per head, values of
``v_head_dim``): NVIDIA/Megatron-LM issue 1589. The scores need no channel count (they come from
the tensors' own shapes), and the output width is ``kv_channels x heads``, which the config sets
to ``v_head_dim``; so the core attention may drop them.
"""

from __future__ import annotations

from megatron.core.transformer.dot_product_attention import DotProductAttention


class LatentDotProductAttention(DotProductAttention):
    """Megatron's local core attention, taking (and not needing) MLA's per-part head sizes."""

    def __init__(self, *args, k_channels: int | None = None, v_channels: int | None = None, **kw):
        config = kw.get("config", args[0] if args else None)
        if v_channels is not None and config is not None and config.kv_channels != v_channels:
            raise ValueError(
                f"MLA's core attention writes kv_channels={config.kv_channels} per head but the "
                f"values have v_head_dim={v_channels}: they must be equal"
            )
        super().__init__(*args, **kw)
