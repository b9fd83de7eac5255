"""Layer specs: which Megatron module fills each slot of a transformer layer.

The decoder block comes from Megatron's own GPT block spec (dense and MoE layers mixed by
``moe_layer_freq``). On the local (no Transformer Engine) path the norms are swapped for
``SequenceParallelNorm`` so that tensor + sequence parallelism work; on GPUs with Transformer
Engine, its fused norm+linear spec is used. The model families' own modules plug in here as
spec entries, not as edited transformers:

- ``model.moe.router``: the MoE layer's router class (top-k, Yuan's attention router, GRIN's
  SparseMixer-v2; model/routers/).
- ``model.attention: lfa``: Yuan's localized filtering in the q/k/v projection slot
  (model/layers/lfa.py).
- ``model.attention_output_bias``: a bias on the attention's output projection alone (GRIN /
  PhiMoE), which Megatron otherwise ties to ``add_bias_linear`` (every linear, MLPs included).
- ``model.mod``: Mixture-of-Depths, the layer itself is ``MixtureOfDepthsLayer`` (a
  TransformerLayer subclass; each layer decides from its global number whether it is routed;
  model/layers/mixture_of_depths.py).
- ``model.moe.expert_kind: adapter``: PESC's MoE layer, adapter experts around a shared FFN
  (model/layers/adapter_experts.py).
- ``model.peer``: PEER's product-key retrieval of singleton experts in the MLP slot of the
  listed layers (model/layers/peer.py).
- ``model.qk_norm_scope: projection``: OLMoE's QK-norm over whole projections in the query and
  key norm slots (model/norm.py).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from .norm import SequenceParallelNorm
from .routers import router_builder


@dataclass(frozen=True)
class LayerChoices:
    """What the model config asks of each layer beyond Megatron's GPT spec."""

    router: str = "topk"
    sparsemixer_jitter_eps: float = 0.01
    attention: str = "standard"  # or "lfa"
    attention_output_bias: bool = False
    depth_routing: object = None  # layers.mixture_of_depths.DepthRouting, or None
    adapters: tuple | None = None  # (dim, activation, moe_scaling, dropout): PESC adapter experts
    peer: tuple | None = None  # (layers, layers.peer.PeerSettings): PEER in those layers' MLP slot
    projection_qk_norm: bool = False  # OLMoE's QK-norm over whole projections (model/norm.py)

    @classmethod
    def from_model(cls, model) -> "LayerChoices":
        moe = model.moe
        return cls(
            router=moe.router if moe else "topk",
            sparsemixer_jitter_eps=moe.sparsemixer_jitter_eps if moe else 0.01,
            attention=model.attention,
            attention_output_bias=model.attention_output_bias,
            depth_routing=_depth_routing(model),
            adapters=_adapters(moe),
            peer=_peer(model),
            projection_qk_norm=model.qk_norm and model.qk_norm_scope == "projection",
        )


def _peer(model) -> tuple | None:
    if model.peer is None:
        return None
    from .layers.peer import PeerSettings

    return tuple(model.peer.layers), PeerSettings.from_config(model.peer)


def _adapters(moe) -> tuple | None:
    if moe is None or moe.expert_kind != "adapter":
        return None
    return (moe.adapter_dim, moe.adapter_activation, moe.moe_scaling, moe.adapter_dropout)


def decoder_block_spec(
    config: TransformerConfig,
    use_transformer_engine: bool,
    vp_stage: int | None,
    choices: LayerChoices = LayerChoices(),
) -> TransformerBlockSubmodules:
    block = get_gpt_decoder_block_spec(
        config,
        use_transformer_engine=use_transformer_engine,
        normalization=config.normalization,
        vp_stage=vp_stage,
    )
    return with_layer_choices(block, config, use_transformer_engine, vp_stage, choices)


def multi_token_prediction_spec(
    config: TransformerConfig,
    block: TransformerBlockSubmodules,
    use_transformer_engine: bool,
    vp_stage: int | None,
):
    """The MTP modules of this pipeline stage (model.mtp_layers; None where the stage has none:
    Megatron puts them all on the last stage). Each repeats the last decoder layer's spec, ours
    included; without Transformer Engine its three norms become ``SequenceParallelNorm``."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_mtp_block_spec

    if not config.mtp_num_layers:
        return None
    spec = get_gpt_mtp_block_spec(config, block, use_transformer_engine, vp_stage=vp_stage)
    if spec is None or use_transformer_engine:
        return spec
    norms = dict.fromkeys(("enorm", "hnorm", "layer_norm"), SequenceParallelNorm)
    layers = [
        replace(layer, submodules=replace(layer.submodules, **norms)) for layer in spec.layer_specs
    ]
    return replace(spec, layer_specs=layers)


def with_layer_choices(
    block: TransformerBlockSubmodules,
    config: TransformerConfig,
    use_transformer_engine: bool,
    vp_stage: int | None,
    choices: LayerChoices,
) -> TransformerBlockSubmodules:
    """Our modules in Megatron's block spec. With Transformer Engine, a norm that TE fuses into
    the linear after it is put back as ``TENorm`` where our module replaces that linear; without
    it, every norm becomes ``SequenceParallelNorm``."""
    layers = [_apply_choices(spec, choices, use_transformer_engine) for spec in block.layer_specs]
    if choices.peer is not None:
        layers = _with_peer(layers, choices.peer, config, vp_stage, use_transformer_engine)
    if use_transformer_engine:
        return replace(block, layer_specs=layers)
    return TransformerBlockSubmodules(
        layer_specs=[_with_local_norms(spec) for spec in layers],
        layer_norm=SequenceParallelNorm,
    )


def _with_peer(layers: list, peer: tuple, config, vp_stage, use_te: bool) -> list:
    """PEER (model/layers/peer.py) in the MLP slot of the listed global layer numbers."""
    from megatron.core import parallel_state
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    from .layers.peer import PeerLayer

    chosen, settings = peer
    offset = (
        get_transformer_layer_offset(config, vp_stage)
        if parallel_state.model_parallel_is_initialized()
        else 0
    )
    out = []
    for i, layer in enumerate(layers):
        if offset + i in chosen:
            extra = {}
            if use_te:  # TE fuses the pre-MLP norm into linear_fc1; PEER needs it apart
                from megatron.core.extensions.transformer_engine import TENorm

                extra["pre_mlp_layernorm"] = TENorm
            mlp = ModuleSpec(module=PeerLayer, params={"settings": settings})
            # The local spec saves the pre-MLP norm under TE's fused name (mlp.linear_fc1.
            # layer_norm_weight); PEER has no linear_fc1: keep the norm's own name.
            keys = {
                k: v
                for k, v in layer.submodules.sharded_state_dict_keys_map.items()
                if k != "pre_mlp_layernorm."
            }
            layer = replace(
                layer,
                submodules=replace(
                    layer.submodules, mlp=mlp, sharded_state_dict_keys_map=keys, **extra
                ),
            )
        out.append(layer)
    return out


def _with_local_norms(layer: ModuleSpec) -> ModuleSpec:
    sub = replace(
        layer.submodules,
        input_layernorm=SequenceParallelNorm,
        pre_mlp_layernorm=SequenceParallelNorm,
        self_attention=_with_local_qk_norms(layer.submodules.self_attention),
    )
    return replace(layer, submodules=sub)


def _with_local_qk_norms(attention: ModuleSpec) -> ModuleSpec:
    """QK-norm's per-head norms (model.qk_norm) and MLA's norms of the query and key-value
    latents as SequenceParallelNorm too: Megatron's local norm refuses sequence parallelism, and
    their gradients, partial per tensor-parallel rank (other heads, or other tokens under SP),
    are summed by Megatron once whichever rule marks them."""
    sub = attention.submodules
    if not hasattr(sub, "q_layernorm"):
        return attention
    norms = {
        name: SequenceParallelNorm
        for name in ("q_layernorm", "k_layernorm", "kv_layernorm")  # MLA: q and kv latents
        if getattr(sub, name, None) is not None
        and not _is_identity(getattr(sub, name))
        and not _is_projection_norm(getattr(sub, name))
    }
    return replace(attention, submodules=replace(sub, **norms)) if norms else attention


def _is_projection_norm(spec) -> bool:
    from .norm import ProjectionRMSNorm

    return isinstance(spec, type) and issubclass(spec, ProjectionRMSNorm)


def _is_identity(spec) -> bool:
    from megatron.core.transformer.identity_op import IdentityOp

    return spec is IdentityOp or getattr(spec, "module", None) is IdentityOp


def _with_projection_qk_norm(layer: ModuleSpec) -> ModuleSpec:
    """OLMoE's QK-norm in the slots of Megatron's per-head one (left empty: qk_layernorm off)."""
    from .norm import KeyProjectionRMSNorm, ProjectionRMSNorm

    attention = layer.submodules.self_attention
    norms = dict(q_layernorm=ProjectionRMSNorm, k_layernorm=KeyProjectionRMSNorm)
    attention = replace(attention, submodules=replace(attention.submodules, **norms))
    return replace(layer, submodules=replace(layer.submodules, self_attention=attention))


def _apply_choices(layer: ModuleSpec, choices: LayerChoices, use_te: bool) -> ModuleSpec:
    if choices.projection_qk_norm:
        layer = _with_projection_qk_norm(layer)
    sub = layer.submodules
    mlp = sub.mlp
    if mlp.module is MoELayer and choices.router != "topk":
        builder = router_builder(choices.router, choices.sparsemixer_jitter_eps)
        mlp = replace(mlp, submodules=replace(mlp.submodules, router=builder))
    if mlp.module is MoELayer and choices.adapters is not None:
        from .layers.adapter_experts import adapter_layer_spec

        mlp = adapter_layer_spec(mlp, *choices.adapters)
    attn = sub.self_attention
    attn_sub = attn.submodules
    extra = {}
    if choices.attention == "lfa":
        from .layers.lfa import LocalizedFilteringQKV

        attn_sub = replace(attn_sub, linear_qkv=LocalizedFilteringQKV)
        if use_te:  # TE fuses the input norm into linear_qkv; LFA's projection needs it apart
            from megatron.core.extensions.transformer_engine import TENorm

            extra["input_layernorm"] = TENorm
    if choices.attention_output_bias:
        attn_sub = replace(attn_sub, linear_proj=_biased(attn_sub.linear_proj))
    if hasattr(attn_sub, "linear_kv_down_proj") and not use_te:  # MLA on the local path
        from .layers.latent_attention import LatentDotProductAttention

        attn_sub = replace(attn_sub, core_attention=LatentDotProductAttention)
    attn = replace(attn, submodules=attn_sub)
    layer = replace(layer, submodules=replace(sub, self_attention=attn, mlp=mlp, **extra))
    if choices.depth_routing is not None:
        from .layers.mixture_of_depths import MixtureOfDepthsLayer

        layer = replace(
            layer,
            module=MixtureOfDepthsLayer,
            params={**(layer.params or {}), "routing": choices.depth_routing},
        )
    return layer


def _depth_routing(model):
    if model.mod is None:
        return None
    from .layers.mixture_of_depths import DepthRouting

    mod = model.mod
    return DepthRouting(
        routed_layers=tuple(mod.routed_layers(model.num_layers)),
        capacity=mod.capacity,
        causal=mod.causal,
        predictor_hidden_size=mod.predictor_hidden_size,
        aux_loss_coeff=mod.aux_loss_coeff,
    )


def _biased(linear_cls: type) -> type:
    """``linear_cls`` built with a bias whatever ``add_bias_linear`` says."""
    if not isinstance(linear_cls, type):
        raise TypeError(
            f"attention_output_bias needs a linear class in the spec, got {linear_cls!r}"
        )

    class BiasedLinear(linear_cls):
        def __init__(self, *args, bias: bool, **kwargs) -> None:
            super().__init__(*args, bias=True, **kwargs)

    BiasedLinear.__name__ = BiasedLinear.__qualname__ = f"Biased{linear_cls.__name__}"
    return BiasedLinear
