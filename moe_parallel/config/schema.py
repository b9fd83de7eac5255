"""The typed schema of a run: model, parallel layout, training, data, checkpoints, logging.

YAML files under configs/ are instances of ``RunConfig``; unknown keys are errors (with a
did-you-mean, see load.py), every field is type-checked by pydantic, and the cross-field rules
(layout divisibility, MoE + TP needs sequence parallelism, ...) raise ``ValueError`` naming the
field, the value and what is allowed.  Nothing here imports torch or Megatron.
"""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator

from .finetune import FinetuneConfig, check_finetune


class Strict(BaseModel):
    """Unknown keys are errors; values are validated on assignment too (overrides)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=False)


class MoEConfig(Strict):
    num_experts: PositiveInt
    top_k: PositiveInt = 2
    expert_ffn_hidden_size: PositiveInt
    # Shared experts run on every token (DeepSeekMoE); width = n_shared * expert width.
    shared_expert_ffn_hidden_size: Optional[PositiveInt] = None
    # Shared expert output scaled by sigmoid(x . w_gate) (Qwen2-MoE); Megatron moe_shared_expert_gate.
    shared_expert_gate: bool = False
    # 1 = every layer is MoE; N = every Nth layer; a list of 0/1 gives the pattern per layer.
    layer_freq: Union[PositiveInt, list[Literal[0, 1]]] = 1
    # "topk": Megatron's linear gate. "attention": Yuan 2.0-M32's attention router (experts'
    # logits from an attention over the expert dimension). "sparsemixer": GRIN's SparseMixer-v2
    # (sampled top-2 with its gradient estimator; deterministic top-2 in evaluation).
    router: Literal["topk", "attention", "sparsemixer"] = "topk"
    # SparseMixer-v2 masks experts whose logit trails the max by more than 2 * this (relative);
    # GRIN / PhiMoE: router_jitter_noise = 0.01.
    sparsemixer_jitter_eps: float = Field(0.01, gt=0)
    # Multiplicative uniform jitter of the router's input in training, x * U(1-eps, 1+eps)
    # (PhiMoE input_jitter_noise = 0.01; Megatron's moe_input_jitter_eps). None = off.
    input_jitter_eps: Optional[float] = Field(None, gt=0, lt=1)
    score_function: Literal["softmax", "sigmoid"] = "softmax"
    # Auxiliary-loss-free balancing (DeepSeek-V3, arXiv 2412.19437 sec. 2.1.2): a per-expert bias
    # added to the sigmoid scores for the choice of experts only, moved by update_rate toward the
    # balanced load after every global batch (Megatron moe_router_enable_expert_bias; a buffer,
    # saved in checkpoints). expert_bias_update_rate None = Megatron's default; 0 keeps the bias
    # where it is (V3 set it to 0 for its last 500B tokens, section 4.2).
    expert_bias: bool = False
    expert_bias_update_rate: Optional[float] = Field(None, ge=0)
    # The routed experts' weights times this (DeepSeek-V3 routed_scaling_factor = 2.5).
    routed_scaling_factor: Optional[float] = Field(None, gt=0)
    # Group-limited routing (DeepSeek-V2/V3 n_group / topk_group): experts form num_groups
    # groups; a token picks its top_k experts inside its best group_topk groups, a group scored
    # by the sum of its best top_k / group_topk scores (Megatron's rule).
    num_groups: Optional[PositiveInt] = None
    group_topk: Optional[PositiveInt] = None
    # The first N layers are dense whatever layer_freq says (DeepSeek first_k_dense_replace).
    first_dense_layers: int = Field(0, ge=0)
    # Softmax over all experts before top-k (DeepSeekMoE, HF Mixtral) vs. over the top-k logits.
    pre_softmax: bool = False
    load_balancing: Literal["aux_loss", "seq_aux_loss", "global_aux_loss", "none"] = "aux_loss"
    aux_loss_coeff: float = Field(0.01, ge=0)
    z_loss_coeff: Optional[float] = Field(None, ge=0)
    dispatcher: Literal["alltoall", "allgather"] = "alltoall"
    # None = dropless. A float enables token dropping at that capacity factor.
    capacity_factor: Optional[float] = Field(None, gt=0)
    # With capacity_factor: pad every expert's input to its capacity too (static gating, the
    # serving baseline of arXiv 2303.06182; serve.gating=static sets it).
    pad_to_capacity: bool = False
    grouped_gemm: bool = False
    router_dtype: Optional[Literal["fp32", "fp64"]] = "fp32"
    # "adapter": PESC / Camelidae (arXiv 2401.02731, model/layers/adapter_experts.py): every
    # token goes through one shared FFN of width expert_ffn_hidden_size; the routed experts are
    # adapters on its output h, A_i(h) = moe_scaling * act(h W_down) W_up + h, the router sees the
    # FFN's input; output = sum over the top-k of g_i A_i(h).
    expert_kind: Literal["ffn", "adapter"] = "ffn"
    adapter_dim: Optional[PositiveInt] = None
    adapter_activation: Literal["gelu", "relu", "silu"] = "gelu"
    moe_scaling: float = Field(1.0, gt=0)
    adapter_dropout: float = Field(0.0, ge=0, lt=1)  # on the adapters' input (Camelidae: 0.1)

    @model_validator(mode="after")
    def _top_k_fits(self) -> "MoEConfig":
        if self.top_k > self.num_experts:
            raise ValueError(
                f"model.moe.top_k={self.top_k} is larger than model.moe.num_experts="
                f"{self.num_experts}: top_k must be between 1 and num_experts"
            )
        if self.router == "sparsemixer" and self.top_k != 2:
            raise ValueError(
                f"model.moe.router=sparsemixer routes to exactly 2 experts "
                f"(SparseMixer-v2 is defined for top-2); got model.moe.top_k={self.top_k}"
            )
        if self.expert_kind == "adapter" and self.adapter_dim is None:
            raise ValueError(
                "model.moe.expert_kind=adapter needs model.moe.adapter_dim (the "
                "adapters' width; PESC / Camelidae: 512)"
            )
        if self.expert_kind != "adapter" and self.adapter_dim is not None:
            raise ValueError(
                f"model.moe.adapter_dim={self.adapter_dim} is for "
                "model.moe.expert_kind=adapter (got expert_kind="
                f"{self.expert_kind!r})"
            )
        if self.expert_kind == "adapter" and self.shared_expert_ffn_hidden_size is not None:
            raise ValueError(
                "model.moe.expert_kind=adapter has its own shared FFN "
                "(expert_ffn_hidden_size wide): unset shared_expert_ffn_hidden_size"
            )
        if self.shared_expert_gate and self.shared_expert_ffn_hidden_size is None:
            raise ValueError(
                "model.moe.shared_expert_gate=true needs a shared expert: set "
                "model.moe.shared_expert_ffn_hidden_size"
            )
        _check_modern_routing(self)
        if self.top_k == 1 and not self.pre_softmax and self.score_function == "softmax":
            # A softmax over the single selected logit is always 1: the router would get no
            # gradient. Megatron refuses it too ("use --moe-router-pre-softmax when topk is 1").
            raise ValueError(
                "model.moe.top_k=1 needs model.moe.pre_softmax=true (softmax over all "
                "experts before the top-1, as in Switch Transformer)"
            )
        return self


def _check_modern_routing(moe: "MoEConfig") -> None:
    """The routing options of the fine-grained families, checked as Megatron would (and where
    Megatron does not check, refused rather than computed differently)."""
    if moe.expert_bias and moe.score_function != "sigmoid":
        raise ValueError(
            "model.moe.expert_bias=true needs model.moe.score_function=sigmoid (auxiliary-loss-"
            f"free balancing biases sigmoid scores; got {moe.score_function!r})"
        )
    if moe.expert_bias_update_rate is not None and not moe.expert_bias:
        raise ValueError("model.moe.expert_bias_update_rate is set but model.moe.expert_bias=false")
    if (moe.num_groups is None) != (moe.group_topk is None):
        raise ValueError(
            "model.moe.num_groups and model.moe.group_topk go together (group-limited routing): "
            f"got num_groups={moe.num_groups}, group_topk={moe.group_topk}"
        )
    if moe.num_groups is None:
        return
    if moe.num_experts % moe.num_groups:
        raise ValueError(
            f"model.moe.num_groups={moe.num_groups} does not divide model.moe.num_experts="
            f"{moe.num_experts}"
        )
    if moe.group_topk > moe.num_groups:
        raise ValueError(
            f"model.moe.group_topk={moe.group_topk} is above model.moe.num_groups={moe.num_groups}"
        )
    if moe.top_k % moe.group_topk:
        raise ValueError(
            f"model.moe.top_k={moe.top_k} is not divisible by model.moe.group_topk="
            f"{moe.group_topk} (a group is scored by its best top_k / group_topk experts)"
        )
    reachable = moe.group_topk * (moe.num_experts // moe.num_groups)
    if moe.top_k > reachable:
        raise ValueError(
            f"model.moe.top_k={moe.top_k} is above the {reachable} experts of the "
            f"group_topk={moe.group_topk} groups a token may use"
        )


def _check_latent_attention(m: "ModelConfig") -> None:
    if (m.attention == "mla") != (m.latent_attention is not None):
        raise ValueError(
            "model.attention=mla and model.latent_attention go together (got attention="
            f"{m.attention!r}, latent_attention {'set' if m.latent_attention else 'unset'})"
        )
    if m.attention != "mla":
        return
    if m.num_query_groups is not None or m.kv_channels is not None or m.qk_norm:
        raise ValueError(
            "model.attention=mla sets its own head sizes, key-value sharing and norms: unset "
            "model.num_query_groups, model.kv_channels and model.qk_norm"
        )
    if m.position_embedding != "rope":
        raise ValueError(
            f"model.attention=mla needs model.position_embedding=rope (got {m.position_embedding!r})"
        )


def _check_multi_token_prediction(m: "ModelConfig") -> None:
    if m.mtp_layers == 0:
        if m.mtp_loss_weight is not None:
            raise ValueError("model.mtp_loss_weight is set but model.mtp_layers=0 (no MTP module)")
        return
    # An MTP module is a copy of the last layer's structure (Megatron takes the last layer's
    # spec); Mixture-of-Depths and PEER layers replace blocks and FFNs by our own modules, which
    # an MTP module would not reproduce.
    for name, value in (("model.mod", m.mod), ("model.peer", m.peer)):
        if value is not None:
            raise ValueError(
                f"model.mtp_layers={m.mtp_layers} cannot be combined with {name}; unset one of them"
            )
    if m.position_embedding != "rope":
        raise ValueError(
            f"model.mtp_layers={m.mtp_layers} needs model.position_embedding=rope "
            f"(got {m.position_embedding!r})"
        )


class MoDConfig(Strict):
    """Mixture-of-Depths (arXiv 2404.02258; model/layers/mixture_of_depths.py)."""

    # Fraction of each sequence a routed block processes: k = ceil(capacity x seq_length).
    capacity: float = Field(0.125, gt=0, le=1)
    # N: layers N-1, 2N-1, ... are routed (2 = every other block, the first one full);
    # or a 0/1 list, one per layer.
    layer_freq: Union[PositiveInt, list[Literal[0, 1]]] = 2
    # How evaluation chooses tokens causally: "predictor" (aux MLP on stop-gradient inputs)
    # or "router_bce" (BCE on the router logits, threshold 0). Both train with a BCE loss.
    causal: Literal["predictor", "router_bce"] = "predictor"
    predictor_hidden_size: PositiveInt = 64
    aux_loss_coeff: float = Field(0.01, ge=0)

    def routed_layers(self, num_layers: int) -> list[int]:
        freq = self.layer_freq
        if isinstance(freq, list):
            return [i for i, on in enumerate(freq) if on]
        return [i for i in range(num_layers) if i % freq == freq - 1]


class PeerConfig(Strict):
    """PEER layers (He 2024, "Mixture of A Million Experts"; model/layers/peer.py): the FFN of
    each listed layer becomes N singleton experts retrieved through product keys."""

    num_experts: PositiveInt  # N, a perfect square (two sets of sqrt(N) sub-keys)
    heads: PositiveInt = 8  # h query heads sharing the experts and the keys
    top_k: PositiveInt = 16  # k experts retrieved per head
    key_dim: PositiveInt = 256  # query / product-key dimension per head (each half key_dim/2)
    layers: list[int]  # 0-based indices of the layers whose FFN is replaced
    activation: Literal["gelu", "relu", "sigmoid"] = "gelu"  # the expert's nonlinearity
    query_batch_norm: bool = True
    gather_chunk: PositiveInt = 16384  # (token, expert) pairs gathered at once

    @model_validator(mode="after")
    def _shape(self) -> "PeerConfig":
        import math

        n = math.isqrt(self.num_experts)
        if n * n != self.num_experts:
            raise ValueError(
                f"model.peer.num_experts={self.num_experts} must be a perfect "
                f"square (product keys: two sets of sqrt(N) sub-keys)"
            )
        if self.top_k > n:
            raise ValueError(f"model.peer.top_k={self.top_k} must be at most sqrt(num_experts)={n}")
        if self.key_dim % 2:
            raise ValueError(f"model.peer.key_dim={self.key_dim} must be even (two halves)")
        if len(set(self.layers)) != len(self.layers) or not self.layers:
            raise ValueError(f"model.peer.layers={self.layers}: give each layer index once")
        return self


class LatentAttentionConfig(Strict):
    """Multi-head latent attention (DeepSeek-V2, arXiv 2405.04434 section 2.1; Megatron's
    MLATransformerConfig): keys and values come from one low-rank latent per token, queries
    from another (or straight from the hidden state); each head's query and key are a part
    without RoPE and a RoPE part, the key's RoPE part shared by the heads. Names as Megatron's;
    Hugging Face's in the comments. None = Megatron's default."""

    q_lora_rank: Optional[PositiveInt] = None  # q_lora_rank; None: no query latent (V2-Lite)
    kv_lora_rank: PositiveInt  # kv_lora_rank
    qk_head_dim: PositiveInt  # qk_nope_head_dim
    qk_pos_emb_head_dim: PositiveInt  # qk_rope_head_dim
    v_head_dim: PositiveInt  # v_head_dim
    rope_type: Literal["rope", "yarn"] = "rope"
    # YaRN (rope_type: yarn; rope_scaling in config.json).
    rotary_scaling_factor: Optional[float] = Field(None, gt=0)  # factor
    original_max_position_embeddings: Optional[PositiveInt] = None
    beta_fast: Optional[float] = None
    beta_slow: Optional[float] = None
    mscale: Optional[float] = None
    mscale_all_dim: Optional[float] = None


class ModelConfig(Strict):
    num_layers: PositiveInt
    hidden_size: PositiveInt
    ffn_hidden_size: PositiveInt  # width of dense (non-MoE) FFN layers
    num_attention_heads: PositiveInt
    num_query_groups: Optional[PositiveInt] = None  # GQA; None = MHA
    kv_channels: Optional[PositiveInt] = None  # head dim; None = hidden / heads
    seq_length: PositiveInt
    max_position_embeddings: Optional[PositiveInt] = None  # None = seq_length
    vocab_size: Optional[PositiveInt] = None  # None = the tokenizer's size
    normalization: Literal["RMSNorm", "LayerNorm"] = "RMSNorm"
    norm_epsilon: float = Field(1e-5, gt=0)
    activation: Literal["swiglu", "gelu", "relu"] = "swiglu"
    position_embedding: Literal["rope", "learned_absolute", "none"] = "rope"
    rotary_base: float = Field(10000.0, gt=0)
    rotary_percent: float = Field(1.0, gt=0, le=1)
    add_bias_linear: bool = False
    add_qkv_bias: bool = False
    tie_embeddings: bool = False
    # "lfa": Yuan 2.0's Localized Filtering-based Attention (causal filtering of q/k's input).
    # "mla": multi-head latent attention (DeepSeek-V2/V3), shaped by model.latent_attention.
    attention: Literal["standard", "lfa", "mla"] = "standard"
    latent_attention: Optional[LatentAttentionConfig] = None
    attention_output_bias: bool = False  # bias on the attention output projection only (GRIN)
    # RMSNorm of each head's query and key before RoPE (Qwen3, OLMoE-style QK-norm; Megatron
    # qk_layernorm).
    qk_norm: bool = False
    # What a QK-norm normalises: each head's query and key ("head": Qwen3, Megatron's
    # qk_layernorm) or the whole query and key projections across their heads ("projection":
    # OLMoE's q_norm / k_norm over hidden_size and KV heads x head size).
    qk_norm_scope: Literal["head", "projection"] = "head"
    output_layer_bias: bool = False  # bias on the LM head (GRIN / PhiMoE lm_head_bias)
    # Multi-token prediction (DeepSeek-V3, arXiv 2412.19437 section 2.2): D sequential modules
    # after the last layer, module k predicting the token k+1 positions ahead from the previous
    # depth's hidden state and the embedding of the next token; their mean cross entropy, times
    # mtp_loss_weight, joins the loss (Megatron's mtp_num_layers / mtp_loss_scaling_factor; the
    # weight's default is Megatron's). Only training uses them: evaluation and serving do not.
    mtp_layers: int = Field(0, ge=0)
    mtp_loss_weight: Optional[float] = Field(None, gt=0)
    init_method_std: float = Field(0.02, gt=0)
    hidden_dropout: float = Field(0.0, ge=0, lt=1)
    attention_dropout: float = Field(0.0, ge=0, lt=1)
    moe: Optional[MoEConfig] = None
    mod: Optional[MoDConfig] = None  # Mixture-of-Depths routing of whole blocks
    peer: Optional[PeerConfig] = None  # PEER layers in place of chosen dense FFNs

    @model_validator(mode="after")
    def _heads(self) -> "ModelConfig":
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"model.hidden_size={self.hidden_size} is not divisible by "
                f"model.num_attention_heads={self.num_attention_heads}; set model.kv_channels"
            )
        groups = self.num_query_groups
        if groups is not None and self.num_attention_heads % groups:
            raise ValueError(
                f"model.num_query_groups={groups} must divide "
                f"model.num_attention_heads={self.num_attention_heads}"
            )
        _check_latent_attention(self)
        _check_multi_token_prediction(self)
        if self.qk_norm_scope == "projection" and (
            not self.qk_norm or self.normalization != "RMSNorm"
        ):
            raise ValueError(
                "model.qk_norm_scope=projection needs model.qk_norm=true and "
                f"model.normalization=RMSNorm (got qk_norm={self.qk_norm}, "
                f"normalization={self.normalization!r})"
            )
        if self.moe and self.moe.first_dense_layers >= self.num_layers:
            raise ValueError(
                f"model.moe.first_dense_layers={self.moe.first_dense_layers} leaves no MoE layer "
                f"(model.num_layers={self.num_layers})"
            )
        if self.moe and isinstance(self.moe.layer_freq, list):
            if len(self.moe.layer_freq) != self.num_layers:
                raise ValueError(
                    f"model.moe.layer_freq has {len(self.moe.layer_freq)} entries; "
                    f"it needs one 0/1 per layer (model.num_layers={self.num_layers})"
                )
        if (
            self.mod
            and isinstance(self.mod.layer_freq, list)
            and len(self.mod.layer_freq) != self.num_layers
        ):
            raise ValueError(
                f"model.mod.layer_freq has {len(self.mod.layer_freq)} entries; it "
                f"needs one 0/1 per layer (model.num_layers={self.num_layers})"
            )
        if self.peer is not None:
            bad = [
                i
                for i in self.peer.layers
                if not 0 <= i < self.num_layers or self.moe_layer_pattern[i]
            ]
            if bad:
                raise ValueError(
                    f"model.peer.layers={self.peer.layers}: {bad} are not dense "
                    f"layers in 0..{self.num_layers - 1} (PEER replaces a dense FFN)"
                )
        return self

    @property
    def moe_layer_pattern(self) -> list[int]:
        if self.moe is None:
            return [0] * self.num_layers
        freq, dense = self.moe.layer_freq, self.moe.first_dense_layers
        if isinstance(freq, list):
            pattern = list(freq)
        else:
            pattern = [1 if i % freq == 0 else 0 for i in range(self.num_layers)]
        return [0] * dense + pattern[dense:]


class ParallelSizes:
    """The sizes derived from a layout's fields (a config's ``parallel`` and a planner layout);
    the class using it has ``tensor``, ``pipeline``, ``context``, ``data``, ``expert_tensor``."""

    @property
    def world_size(self) -> int:
        return self.tensor * self.pipeline * self.context * self.data

    @property
    def expert_tensor_size(self) -> int:
        return self.expert_tensor or self.tensor


class ParallelConfig(ParallelSizes, Strict):
    tensor: PositiveInt = 1
    pipeline: PositiveInt = 1
    virtual_pipeline: Optional[PositiveInt] = None  # model chunks per pipeline rank
    # Uneven pipeline stages (Megatron's num_layers_in_first/last_pipeline_stage): the first
    # and last stages hold these many layers, the others share the rest evenly; None = even.
    # E.g. DeepSeek-V3's 61 layers on 16 stages: 3 + 14 x 4 + 2, the MTP module on the last.
    first_stage_layers: Optional[PositiveInt] = None
    last_stage_layers: Optional[PositiveInt] = None
    context: PositiveInt = 1
    expert: PositiveInt = 1
    expert_tensor: Optional[PositiveInt] = None  # None = same as tensor
    data: PositiveInt = 1
    sequence_parallel: bool = False
    distributed_optimizer: bool = True


class TrainConfig(Strict):
    steps: PositiveInt
    global_batch_size: PositiveInt
    micro_batch_size: PositiveInt = 1
    lr: float = Field(3e-4, gt=0)
    min_lr: float = Field(3e-5, ge=0)
    warmup_steps: int = Field(0, ge=0)
    lr_decay: Literal["cosine", "linear", "constant"] = "cosine"
    lr_decay_steps: Optional[PositiveInt] = None  # None = steps
    weight_decay: float = Field(0.1, ge=0)
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.95, ge=0, lt=1)
    adam_eps: float = Field(1e-8, gt=0)
    clip_grad: float = Field(1.0, ge=0)  # 0 disables clipping
    seed: int = 1234
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    fp8: Optional[Literal["hybrid", "e4m3"]] = None
    fp8_recipe: Literal["delayed", "tensorwise"] = "delayed"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Activation recomputation (Megatron): "selective" recomputes core attention in backward,
    # "full" recomputes every layer from its input (uniform, one layer per checkpoint).
    recompute: Literal["none", "selective", "full"] = "none"
    eval_interval: Optional[PositiveInt] = None
    eval_steps: PositiveInt = 2
    # "adapters_and_routers": PESC's tuning (model.moe.expert_kind=adapter): every other
    # parameter is frozen (requires_grad False, not in the optimizer, unchanged by training).
    trainable: Literal["all", "adapters_and_routers"] = "all"


class DataConfig(Strict):
    # Built in (no download): "python-stdlib" (the standard library's sources and pydoc topics),
    # "python-stdlib-code", "python-stdlib-docs", "arithmetic" (see data/corpus.py).
    # Otherwise: paths of .txt / .jsonl files or directories of them.
    sources: list[str] = Field(default_factory=lambda: ["python-stdlib"])
    max_bytes: Optional[PositiveInt] = None  # cap on raw text read from the sources
    # Prepared data (Megatron .bin/.idx prefixes). None = prepare `sources` into cache_dir.
    prefixes: Optional[list[str]] = None
    blend_weights: Optional[list[float]] = None  # one weight per prefix
    tokenizer: Optional[str] = None  # path to a tokenizer.json; None = train one on the sources
    tokenizer_vocab_size: PositiveInt = 4096
    cache_dir: Optional[str] = None  # None = $MOE_PARALLEL_CACHE or ~/.cache/moe-parallel
    split: str = "98,2,0"

    @model_validator(mode="after")
    def _blend(self) -> "DataConfig":
        if self.blend_weights is not None:
            if self.prefixes is None or len(self.blend_weights) != len(self.prefixes):
                raise ValueError(
                    "data.blend_weights needs one weight per entry of data.prefixes "
                    f"(got {len(self.blend_weights)} weights, "
                    f"{0 if self.prefixes is None else len(self.prefixes)} prefixes)"
                )
        parts = self.split.split(",")
        try:
            values = [float(p) for p in parts]
        except ValueError:
            values = []
        if len(parts) != 3 or not values or min(values) < 0 or sum(values) <= 0:
            raise ValueError(
                f"data.split={self.split!r}: expected three non-negative numbers 'train,valid,test'"
                ", e.g. '98,2,0'"
            )
        return self


class CheckpointConfig(Strict):
    interval: Optional[PositiveInt] = None  # steps between saves; None = only at the end
    save_at_end: bool = True
    dir: Optional[str] = None  # None = <run dir>/checkpoints
    # Resume: "auto" = latest in dir if any; "none" = start fresh; or a checkpoint path.
    resume: str = "auto"
    # Weights to start from when the run has none of its own checkpoint (resume=auto found
    # nothing): only the model's weights are taken (as Megatron's --finetune); optimizer, LR
    # schedule and step start at 0. E.g. the seed for a BTX branch, the mix for the finetune.
    # A restarted run resumes its own checkpoints instead.
    init_from: Optional[str] = None
    keep_last: Optional[PositiveInt] = None  # None = keep every checkpoint
    keep_every: Optional[PositiveInt] = None  # with keep_last: also keep steps divisible by this
    # A failed save is recorded and training goes on (``latest`` stays on the previous
    # checkpoint); more failures in a row than this stop the run.
    max_consecutive_failed_saves: int = Field(3, ge=0)
    # Write in the background: training waits only for the snapshot; the next steps poll.
    async_save: bool = False
    save_timeout_s: float = Field(600.0, gt=0)  # report an unfinished async save after this
    # Resuming under another parallel layout: "reshard" carries everything over (model, optimizer
    # moments and step, LR schedule, data position); "reset_optimizer" restarts the moments.
    on_layout_change: Literal["reshard", "reset_optimizer"] = "reshard"


class LogConfig(Strict):
    interval: PositiveInt = 1
    tensorboard: bool = True
    # Weights & Biases next to TensorBoard (moe_parallel/monitor/wandb_sink.py; the wandb extra).
    wandb: bool = False
    wandb_project: str = "moe-parallel"
    wandb_name: Optional[str] = None  # None: the run directory's name
    wandb_mode: Literal["online", "offline", "disabled"] = "offline"
    # Every rank's routing (experts per token per MoE layer) -> RUN_DIR/routing/rankR.npz
    # (moe_parallel/monitor/routing_trace.py format), written when training ends.
    routing_trace: bool = False

    @model_validator(mode="after")
    def _wandb_installed(self) -> "LogConfig":
        import importlib.util

        if self.wandb and importlib.util.find_spec("wandb") is None:
            raise ValueError(
                "log.wandb=true needs the wandb package, which is not installed: "
                "pip install 'moe-parallel[wandb]' (or wandb), or set log.wandb: false"
            )
        return self


class MonitorConfig(Strict):
    """Heartbeats, hang detection, stragglers and expert load (moe_parallel/monitor/)."""

    enabled: bool = True
    heartbeat_interval: float = Field(2.0, gt=0)  # seconds between each rank's heartbeat writes
    # No step progress for this long = a hang: stacks are dumped, the ranks stopped and the run
    # restarted from its latest checkpoint (backend restart path). None = no watchdog.
    hang_timeout: Optional[float] = Field(600.0, gt=0)
    # A rank whose step time stays above (1 + threshold) x the median of the ranks over
    # straggler_window steps is reported as a straggler.
    straggler_threshold: float = Field(0.2, gt=0)
    straggler_window: PositiveInt = 5
    dead_expert_steps: PositiveInt = 10  # an expert with no tokens for this many steps is dead


class RecoveryConfig(Strict):
    """What a run does when it loses ranks (docs/recovery.md; config/recovery.py, cluster/elastic.py).

    ``restart``: the whole run restarts at its configured size from its latest checkpoint (once
    the capacity is there). ``elastic``: when the full size cannot be placed within
    ``wait_for_capacity_s``, the run goes on with fewer data-parallel replicas (down to
    ``min_data_parallel``), with the same global batch and model-parallel shape, and, with
    ``grow_back``, returns to its configured size at the first checkpoint after the capacity
    comes back."""

    mode: Literal["restart", "elastic"] = "restart"
    min_data_parallel: PositiveInt = 1
    # As long as Ray's default wait for a placement (ray.placement_timeout_s) before giving up.
    wait_for_capacity_s: float = Field(120.0, ge=0)
    grow_back: bool = True


class RunConfig(Strict):
    name: str = "run"
    model: ModelConfig
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    train: TrainConfig
    data: DataConfig = Field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    monitor: MonitorConfig = Field(default_factory=MonitorConfig)
    recovery: RecoveryConfig = Field(default_factory=RecoveryConfig)
    # Instruction finetuning (config/finetune.py); None = pretraining on data.sources.
    finetune: Optional[FinetuneConfig] = None

    @model_validator(mode="after")
    def _layout(self) -> "RunConfig":
        from .recovery import check_recovery
        from .rules import check_run

        check_run(self)
        check_finetune(self)
        check_recovery(self)
        return self

    @property
    def world_size(self) -> int:
        return self.parallel.world_size

    @property
    def num_microbatches(self) -> int:
        return self.train.global_batch_size // (self.train.micro_batch_size * self.parallel.data)
