"""Config validation: every bad config is refused before anything starts, naming the field."""

from __future__ import annotations

import pytest

from moe_parallel.config import ConfigError, check_world_size, load_config, resolve_device
from tests.conftest import TINY

BAD = [
    # (overrides, words the message must contain)
    (["parallel.expert=3"], ["model.moe.num_experts=4", "parallel.expert=3", "[1, 2, 4]"]),
    (["parallel.tensor=3"], ["num_attention_heads=4", "parallel.tensor=3"]),
    (
        ["parallel.pipeline=3", "parallel.data=1", "parallel.expert=1"],
        ["model.num_layers=4", "parallel.pipeline=3"],
    ),
    (
        [
            "parallel.pipeline=2",
            "parallel.virtual_pipeline=4",
            "parallel.data=1",
            "parallel.expert=1",
        ],
        ["model.num_layers=4", "virtual_pipeline"],
    ),
    (["parallel.tensor=2"], ["sequence_parallel"]),
    (["model.moe.top_k=5"], ["top_k=5", "num_experts=4"]),
    (["model.moe.top_k=1"], ["top_k=1 needs model.moe.pre_softmax=true"]),
    (["train.fp8=hybrid", "train.device=cpu"], ["train.fp8", "cpu"]),
    (["train.fp8=hybrid", "train.precision=fp32"], ["train.fp8", "fp32"]),
    (["model.hiden_size=64"], ["model.hiden_size", "unknown key", "did you mean 'hidden_size'"]),
    (["parallel.expet=2"], ["parallel.expet", "did you mean 'expert'"]),
    (["trian.steps=3"], ["trian", "did you mean 'train'"]),
    (["train.steps=ten"], ["train.steps", "integer", "ten"]),
    (["model.moe.dispatcher=flex"], ["model.moe.dispatcher", "alltoall", "allgather"]),
    (["model.normalization=BatchNorm"], ["model.normalization", "RMSNorm", "LayerNorm"]),
    (["train.global_batch_size=6"], ["global_batch_size=6", "micro_batch_size x parallel.data"]),
    (["model.num_query_groups=3"], ["num_query_groups=3", "num_attention_heads=4"]),
    (
        ["model.moe.capacity_factor=1.25", "model.moe.dispatcher=allgather"],
        ["capacity_factor", "alltoall"],
    ),
    (["train.warmup_steps=40"], ["warmup_steps=40"]),
    (["train.min_lr=1.0"], ["min_lr", "lr"]),
    (["model.moe.layer_freq=[1,0]"], ["layer_freq", "num_layers=4"]),
    (["data.split=90,10"], ["data.split", "train,valid,test"]),
    (["data.blend_weights=[1.0]"], ["blend_weights", "prefixes"]),
    (["parallel.sequence_parallel=true"], ["sequence_parallel", "parallel.tensor > 1"]),
    (["model.moe=null", "parallel.expert=2"], ["parallel.expert=2", "model.moe"]),
    (["train.lr=-1"], ["train.lr", "greater than 0"]),
    # the model families' modules
    (["model.moe.router=switch"], ["model.moe.router", "'topk'", "'attention'", "'sparsemixer'"]),
    (
        ["model.moe.router=sparsemixer", "model.moe.top_k=3"],
        ["sparsemixer", "exactly 2", "top_k=3"],
    ),
    (
        ["model.moe.router=sparsemixer", "parallel.context=2", "parallel.data=1"],
        ["sparsemixer", "parallel.context=1"],
    ),
    (
        ["model.moe.router=attention", "model.add_bias_linear=true"],
        ["attention", "add_bias_linear"],
    ),
    (
        [
            "model.moe=null",
            "parallel.expert=1",
            "model.attention=lfa",
            "parallel.tensor=2",
            "parallel.data=1",
        ],
        ["model.attention=lfa", "sequence_parallel=true"],
    ),
    (["model.attention=flash"], ["model.attention", "'standard'", "'lfa'"]),
    (["parallel.data=0"], ["parallel.data", "greater than 0"]),
    (
        ["train.eval_interval=5", "data.split=100,0,0"],
        ["train.eval_interval=5", "validation share"],
    ),
]


@pytest.mark.parametrize("overrides,words", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_config_is_refused_with_the_field_named(overrides, words):
    with pytest.raises(ConfigError) as err:
        load_config(TINY, overrides)
    message = str(err.value)
    for word in words:
        assert word in message, f"{word!r} missing from:\n{message}"


def test_world_size_must_equal_layout_product():
    cfg = load_config(TINY)  # tensor 1 x pipeline 1 x context 1 x data 2
    check_world_size(cfg, 2)
    with pytest.raises(ValueError, match=r"3 ranks .* = 2"):
        check_world_size(cfg, 3)


def test_fp8_needs_a_gpu_and_transformer_engine():
    cfg = load_config(TINY, ["train.fp8=hybrid", "train.precision=bf16"])
    with pytest.raises(ValueError, match="FP8 needs Transformer Engine on GPUs"):
        resolve_device(cfg, cuda_available=False)


ONE_STAGE = ["parallel.data=1", "parallel.expert=1"]  # two ranks left for context parallelism


def test_context_parallelism_is_refused_on_cpu_ranks():
    cfg = load_config(TINY, [*ONE_STAGE, "parallel.context=2"])  # the layout itself is valid
    with pytest.raises(ValueError) as err:
        resolve_device(cfg, cuda_available=False)
    assert str(err.value) == (
        "parallel.context=2 needs Transformer Engine's attention on GPUs; on CPU ranks use "
        "parallel.context=1"
    )
    resolve_device(load_config(TINY, ONE_STAGE), cuda_available=False)  # context=1 runs


def test_fp16_is_refused_on_cpu_ranks_when_the_device_is_auto():
    cfg = load_config(TINY, ["train.precision=fp16"])  # train.device: auto
    with pytest.raises(ValueError, match=r"precision='fp16' does not run on CPU ranks"):
        resolve_device(cfg, cuda_available=False)
    assert resolve_device(cfg, cuda_available=True) == "cuda"


def test_grouped_gemm_is_refused_on_cpu_ranks():
    cfg = load_config(TINY, ["model.moe.grouped_gemm=true"])
    with pytest.raises(ValueError, match=r"grouped_gemm=true needs CUDA grouped-GEMM kernels"):
        resolve_device(cfg, cuda_available=False)


def test_gpu_ranks_need_transformer_engine_for_context_parallelism_and_grouped_gemm(monkeypatch):
    """On GPU ranks the same options need Transformer Engine (grouped GEMM: or the grouped_gemm
    package): refused when it is missing, accepted when it is there."""
    import importlib.util

    real_find_spec = importlib.util.find_spec
    installed = set()

    def find_spec(name, *args):
        if name in ("transformer_engine", "grouped_gemm"):  # any spec stands for "installed"
            return real_find_spec("json") if name in installed else None
        return real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    context = load_config(TINY, [*ONE_STAGE, "parallel.context=2"])
    grouped = load_config(TINY, ["model.moe.grouped_gemm=true"])
    with pytest.raises(ValueError, match=r"context=2 needs Transformer Engine's attention, which"):
        resolve_device(context, cuda_available=True)
    with pytest.raises(ValueError, match=r"neither is installed"):
        resolve_device(grouped, cuda_available=True)
    installed.add("grouped_gemm")  # the legacy GroupedMLP's kernels
    assert resolve_device(grouped, cuda_available=True) == "cuda"
    installed.add("transformer_engine")
    assert resolve_device(context, cuda_available=True) == "cuda"
    with pytest.raises(ValueError, match=r"on CPU ranks use parallel.context=1"):
        resolve_device(context, cuda_available=False)  # Transformer Engine never runs on CPU


def test_moectl_train_refuses_context_parallelism_on_cpu_before_anything_starts(tmp_path, capsys):
    from launch.cli import main

    runs = tmp_path / "runs"
    code = main(
        ["train", str(TINY), "--runs", str(runs), *ONE_STAGE, "parallel.context=2"]
        + ["train.device=cpu"]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert err == (
        "moectl: error: parallel.context=2 needs Transformer Engine's attention on GPUs; on CPU "
        "ranks use parallel.context=1\n"
    )
    assert not runs.exists()


def test_cuda_asked_for_on_a_cpu_machine():
    cfg = load_config(TINY, ["train.device=cuda"])
    with pytest.raises(ValueError, match="no CUDA GPU"):
        resolve_device(cfg, cuda_available=False)


def test_missing_file_and_bad_override_syntax(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        load_config(TINY, ["train.steps"])


def test_overrides_are_typed_and_applied():
    cfg = load_config(TINY, ["train.steps=7", "model.moe.layer_freq=[1,0,1,0]", "train.lr=1e-3"])
    assert cfg.train.steps == 7
    assert cfg.model.moe_layer_pattern == [1, 0, 1, 0]
    assert cfg.train.lr == pytest.approx(1e-3)
    assert cfg.num_microbatches == 8 // (2 * 2)


def test_every_shipped_config_validates():
    from pathlib import Path

    configs = sorted((Path(TINY).parents[1]).glob("*/*.yaml"))
    run_configs = [p for p in configs if p.parent.name in ("tiny", "models")]
    assert run_configs
    for path in run_configs:
        load_config(path)


MODERN_ROUTING_ERRORS = [
    (["model.moe.expert_bias=true"], "expert_bias=true needs model.moe.score_function=sigmoid"),
    (["model.moe.expert_bias_update_rate=0.01"], "expert_bias=false"),
    (["model.moe.num_groups=2"], "num_groups and model.moe.group_topk go together"),
    (["model.moe.num_groups=3", "model.moe.group_topk=1"], "num_groups=3 does not divide"),
    (["model.moe.num_groups=2", "model.moe.group_topk=4"], "group_topk=4 is above"),
    (["model.moe.num_groups=4", "model.moe.group_topk=4", "model.moe.top_k=2"], "not divisible"),
    (["model.moe.num_groups=4", "model.moe.group_topk=1", "model.moe.top_k=2"], "top_k=2 is above"),
    (["model.moe.first_dense_layers=4"], "first_dense_layers=4 leaves no MoE layer"),
]


@pytest.mark.parametrize("overrides,message", MODERN_ROUTING_ERRORS)
def test_modern_routing_options_are_checked_naming_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TINY, overrides)


def test_modern_routing_reaches_megatrons_config():
    from moe_parallel.config.megatron import transformer_config

    cfg = load_config(
        TINY,
        [
            "model.qk_norm=true",
            "model.moe.score_function=sigmoid",
            "model.moe.expert_bias=true",
            "model.moe.expert_bias_update_rate=0.01",
            "model.moe.num_groups=2",
            "model.moe.group_topk=1",
            "model.moe.routed_scaling_factor=2.5",
            "model.moe.first_dense_layers=1",
        ],
    )
    tc = transformer_config(cfg, on_cpu=True)  # Megatron's own checks pass too
    assert (tc.qk_layernorm, tc.moe_router_enable_expert_bias) == (True, True)
    assert (tc.moe_router_num_groups, tc.moe_router_group_topk) == (2, 1)
    assert (tc.moe_router_topk_scaling_factor, tc.moe_router_bias_update_rate) == (2.5, 0.01)
    assert tc.moe_layer_freq == [0, 1, 1, 1]
    default = transformer_config(load_config(TINY, ["model.moe.score_function=sigmoid"]), True)
    assert default.moe_router_bias_update_rate == 1e-3  # Megatron's default when unset


V3_TINY = TINY.parent / "deepseek_v3_tiny.yaml"


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            ["model.attention=standard"],
            "model.attention=mla and model.latent_attention go together",
        ),
        (["model.num_query_groups=2"], "unset model.num_query_groups, model.kv_channels"),
        (
            ["model.qk_norm=true"],
            "unset model.num_query_groups, model.kv_channels and model.qk_norm",
        ),
        (["model.position_embedding=learned_absolute"], "needs model.position_embedding=rope"),
        (
            ["model.moe=null", "parallel.tensor=2", "parallel.expert=1", "parallel.data=1"],
            "model.attention=mla with parallel.tensor=2 needs parallel.sequence_parallel=true",
        ),
    ],
)
def test_latent_attention_is_checked_naming_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(V3_TINY, overrides)


def test_latent_attention_reaches_megatrons_mla_config():
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    from moe_parallel.config.megatron import transformer_config

    tc = transformer_config(load_config(V3_TINY), on_cpu=True)
    assert isinstance(tc, MLATransformerConfig) and tc.multi_latent_attention
    assert (tc.q_lora_rank, tc.kv_lora_rank, tc.qk_head_dim, tc.qk_pos_emb_head_dim) == (
        32,
        16,
        16,
        8,
    )
    assert tc.kv_channels == tc.v_head_dim == 16 and tc.num_query_groups == tc.num_attention_heads
    assert tc.rope_type == "rope" and tc.qk_layernorm


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["model.mtp_loss_weight=0.3"], "model.mtp_loss_weight is set but model.mtp_layers=0"),
        (["model.mtp_layers=-1"], "mtp_layers"),
        (["model.mtp_layers=1", "model.mtp_loss_weight=0"], "mtp_loss_weight"),
        (
            ["model.mtp_layers=1", "model.mod.capacity=0.5"],
            "model.mtp_layers=1 cannot be combined with model.mod",
        ),
        (
            ["model.mtp_layers=1", "model.position_embedding=learned_absolute"],
            "model.mtp_layers=1 needs model.position_embedding=rope",
        ),
    ],
)
def test_multi_token_prediction_is_checked_naming_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TINY, overrides)


def test_multi_token_prediction_reaches_megatrons_config():
    from megatron.core.transformer.transformer_config import TransformerConfig

    from moe_parallel.config.megatron import transformer_config

    tc = transformer_config(load_config(V3_TINY), on_cpu=True)
    assert (tc.mtp_num_layers, tc.mtp_loss_scaling_factor) == (1, 0.3)
    unset = transformer_config(load_config(V3_TINY, ["model.mtp_loss_weight=null"]), True)
    # The weight's default is Megatron's own.
    assert unset.mtp_loss_scaling_factor == TransformerConfig.mtp_loss_scaling_factor
    assert transformer_config(load_config(TINY), True).mtp_num_layers is None


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["parallel.first_stage_layers=1"], "need parallel.pipeline > 1"),
        (
            [
                "parallel.pipeline=2",
                "parallel.first_stage_layers=1",
                "parallel.last_stage_layers=2",
            ],
            "leave 1 of model.num_layers=4 for the 0 other stages",
        ),
        (
            ["parallel.pipeline=3", "parallel.first_stage_layers=1", "parallel.expert=1"],
            "leave 3 of model.num_layers=4 for the 2 other stages",
        ),
    ],
)
def test_uneven_pipeline_stages_are_checked_naming_the_fields(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TINY, overrides)


def test_uneven_pipeline_stages_reach_megatron_and_the_planner():
    from moe_parallel.config.megatron import transformer_config
    from moe_parallel.config.rules import stage_layers
    from moe_parallel.plan.memory import Layout, chunk_layers

    cfg = load_config(
        TINY, ["parallel.pipeline=2", "parallel.first_stage_layers=1", "parallel.expert=1"]
    )
    tc = transformer_config(cfg, on_cpu=True)
    assert (tc.num_layers_in_first_pipeline_stage, tc.num_layers_in_last_pipeline_stage) == (
        1,
        None,
    )
    layout = Layout.of(cfg)
    assert [chunk_layers(cfg.model, layout, r) for r in (0, 1)] == [[[0]], [[1, 2, 3]]]
    # DeepSeek-V3's 61 layers on 16 stages: 3 dense layers first, 14 x 4, 2 and the MTP last.
    assert stage_layers(61, 16, 3, 2) == [3, *[4] * 14, 2]


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["model.qk_norm_scope=projection"], "qk_norm_scope=projection needs model.qk_norm=true"),
        (
            [
                "model.qk_norm=true",
                "model.qk_norm_scope=projection",
                "model.normalization=LayerNorm",
            ],
            "normalization=RMSNorm",
        ),
    ],
)
def test_projection_qk_norm_is_checked_naming_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TINY, overrides)


def test_projection_qk_norm_is_our_module_not_megatrons_per_head_one():
    from moe_parallel.config.megatron import transformer_config

    cfg = load_config(TINY.parent / "olmoe_tiny.yaml")
    # Megatron's qk_layernorm off: its gradient rule would sum our tensor-parallel slices.
    assert transformer_config(cfg, on_cpu=True).qk_layernorm is False
