"""``moectl convert`` on tiny Hugging Face models that ``transformers`` builds with random weights
(no download): HF -> Megatron -> our logits and our training-path loss under EP1 (1 rank), EP2
(2 gloo ranks) and TP2+SP equal to transformers' (the padded vocabulary out of the softmax);
fields config.json leaves out take transformers' defaults; Megatron -> HF -> ``from_pretrained``
gives every tensor unchanged; a finetune starts from the converted checkpoint through
``checkpoint.init_from``; a refused conversion leaves no output directory behind; DeepSeek-V3's
multi-token prediction module is skipped with a logged line both ways."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers  # noqa: E402  (the test extra installs it)

from cluster import RunSpec, run_local
from moe_parallel.model.padded_vocab import PADDED_LOGIT
from moe_parallel.runtime.bootstrap import local_rank_preload
from tests.conftest import REPO

pytestmark = pytest.mark.integration

TOLERANCE = 1e-4
# Our fp32 training-path loss against transformers' on the same weights and tokens (measured
# 0 to 5e-7; with the padded rows' zero logits in the softmax it was 0.2 above for Qwen2-MoE).
LOSS_TOLERANCE = 2e-6
EP1 = (1, [])
EP2 = (2, ["parallel.data=2", "parallel.expert=2"])
TP2_SP_EP2 = (
    2,
    [
        "parallel.tensor=2",
        "parallel.sequence_parallel=true",
        "parallel.expert=2",
        "parallel.expert_tensor=1",
    ],
)


def _randomise(model) -> None:
    """All parameters random (biases and norms too, which HF initialises to 0 and 1)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0, 0.1) if "norm" in name else p.normal_(0.0, 0.1)


def _drop_from_config(path: Path, *fields: str) -> None:
    config = json.loads((path / "config.json").read_text())
    for field in fields:
        config.pop(field, None)
    (path / "config.json").write_text(json.dumps(config))


# Sizes every tiny model shares; each builder gives its architecture's own fields.
TINY_SHAPE = dict(hidden_size=32, num_attention_heads=4, max_position_embeddings=64)


def _tiny_hf_model(path: Path, arch: str, **fields):
    """transformers' ``{arch}ForCausalLM`` with ``{arch}Config(**TINY_SHAPE, **fields)`` in fp32,
    every parameter random, saved to ``path``; the model in evaluation mode."""
    config = getattr(transformers, f"{arch}Config")(**TINY_SHAPE, **fields, dtype="float32")
    model = getattr(transformers, f"{arch}ForCausalLM")(config)
    _randomise(model)
    model.save_pretrained(path)
    return model.eval()


def _mixtral(path: Path):
    """config.json without rope_theta and rms_norm_eps: transformers' MixtralConfig defaults
    them (1e6, 1e-5), and so must the conversion; the returned model is the one transformers
    loads from the directory."""
    _tiny_hf_model(
        path,
        "Mixtral",
        vocab_size=520,
        intermediate_size=48,
        num_hidden_layers=2,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
    )
    _drop_from_config(path, "rope_theta", "rope_parameters", "rope_scaling", "rms_norm_eps")
    return transformers.MixtralForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _qwen2_moe(path: Path):
    return _tiny_hf_model(
        path,
        "Qwen2Moe",
        vocab_size=200,
        intermediate_size=48,
        moe_intermediate_size=24,
        shared_expert_intermediate_size=40,
        num_hidden_layers=3,
        num_key_value_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
        norm_topk_prob=False,
        mlp_only_layers=[1],
        tie_word_embeddings=True,
    )


def _qwen3_moe(path: Path):
    """Qwen3-MoE: per-head QK-norm, no shared expert, a dense layer (mlp_only_layers), a
    vocabulary that is no multiple of 128, weights large enough (0.1 spread) that routing and
    the norms matter."""
    return _tiny_hf_model(
        path,
        "Qwen3Moe",
        vocab_size=200,
        intermediate_size=48,
        moe_intermediate_size=16,
        num_hidden_layers=3,
        num_key_value_heads=2,
        head_dim=12,
        num_experts=8,
        num_experts_per_tok=4,
        norm_topk_prob=True,
        mlp_only_layers=[0],
    )


def _olmoe(path: Path):
    """OLMoE: QK-norm over the whole query and key projections, 8 experts top-4 without
    renormalised weights, GQA (k_norm over the 2 key-value heads)."""
    return _tiny_hf_model(
        path,
        "Olmoe",
        vocab_size=200,
        intermediate_size=16,
        num_hidden_layers=2,
        num_key_value_heads=2,
        num_experts=8,
        num_experts_per_tok=4,
        norm_topk_prob=False,
    )


def _phimoe(path: Path):
    """GRIN's architecture: LayerNorm with bias, q/k/v/o and LM-head biases, SparseMixer-v2."""
    return _tiny_hf_model(
        path,
        "Phimoe",
        vocab_size=300,
        intermediate_size=48,
        num_hidden_layers=2,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        attention_bias=True,
        lm_head_bias=True,
        router_jitter_noise=0.5,
        input_jitter_noise=0.01,
    )


# DeepSeek's latent attention at test size: query latent 24, key-value latent 16, per head 8
# (no RoPE) + 4 (RoPE) for queries and keys and 8 for values; a dense first layer.
TINY_LATENT = dict(
    vocab_size=200,
    intermediate_size=48,
    moe_intermediate_size=16,
    num_hidden_layers=3,
    num_key_value_heads=4,  # = heads (transformers' class default is V3's 128)
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=4,
    v_head_dim=8,
    first_k_dense_replace=1,
    n_routed_experts=8,
    num_experts_per_tok=4,
)


# YaRN as V3's release has it (factor 40 over 4096 positions, mscale and mscale_all_dim 1),
# scaled down (64 = 4 x 16 positions).
YARN = dict(
    rope_type="yarn",
    rope_theta=10000.0,
    factor=4.0,
    original_max_position_embeddings=16,
    beta_fast=32.0,
    beta_slow=1.0,
    mscale=1.0,
    mscale_all_dim=1.0,
)


def _deepseek_v3(path: Path):
    """DeepSeek-V3: MLA with a query latent and YaRN, sigmoid routing with a random expert bias
    among 2 of 4 groups (top-4: 2 experts score a group, as HF's rule), scaled by 2.5; the saved
    file gets an MTP module's tensors (model.layers.3.*), which transformers ignores and so must
    we."""
    from safetensors.torch import load_file, save_file

    model = _tiny_hf_model(
        path,
        "DeepseekV3",
        **TINY_LATENT,
        q_lora_rank=24,
        n_group=4,
        topk_group=2,
        rope_parameters=YARN,
    )
    torch.manual_seed(2)
    with torch.no_grad():
        for layer in model.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.normal_(0.0, 0.1)
    model.save_pretrained(path)
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.3.eh_proj.weight"] = torch.zeros(32, 64)
    tensors["model.layers.3.enorm.weight"] = torch.ones(32)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return model


def _deepseek_v2(path: Path):
    """DeepSeek-V2-Lite's shape: no query latent (q_proj), two shared experts, top-4 of a
    softmax over all experts, not renormalised."""
    return _tiny_hf_model(path, "DeepseekV2", **TINY_LATENT, q_lora_rank=None, n_shared_experts=2)


def _moectl(*args: str) -> subprocess.CompletedProcess:
    """``moectl ARGS`` in this process, its output captured: the conversion job's rank forks
    from this worker's preloaded server instead of importing torch and Megatron again."""
    from launch.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as e:  # argparse's refusals
            code = e.code if isinstance(e.code, int) else 1
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def _our_logits(
    run_dir: Path, converted: Path, tokens: torch.Tensor, layout, losses: list | None = None
) -> list[torch.Tensor]:
    """Each rank's logits of ``tokens`` [B, S + 1] (all but the last token fed); ``losses``
    gets each rank's training-path loss of predicting tokens 1..S."""
    ranks, overrides = layout
    run_dir.mkdir()
    (run_dir / "logits.json").write_text(
        json.dumps(
            {
                "config": str(converted / "config.yaml"),
                "checkpoint": str(converted / "checkpoints" / "step_00000000"),
                "tokens": tokens[:, :-1].tolist(),
                "labels": tokens[:, 1:].tolist(),
                "overrides": overrides,
            }
        )
    )
    entry = [sys.executable, "-m", "tests.integration.hf_logits_check", str(run_dir)]
    spec = RunSpec(
        run_dir, ranks, entry, env={"PYTHONPATH": str(REPO)}, preload=local_rank_preload("cpu")
    )
    code = run_local(spec, stream=False)
    assert code == 0, (run_dir / "logs" / "rank0.log").read_text()[-3000:]
    if losses is not None:
        losses += [
            json.loads((run_dir / f"loss_rank{r}.json").read_text())["loss"] for r in range(ranks)
        ]
    return [torch.load(run_dir / f"logits_rank{r}.pt") for r in range(ranks)]


def _convert_and_compare(tmp_path: Path, build, layouts) -> dict:
    hf_dir, converted, back = tmp_path / "hf", tmp_path / "converted", tmp_path / "back"
    model = build(hf_dir)
    first = done = _moectl("convert", str(hf_dir), str(converted))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    vocab = model.config.vocab_size
    torch.manual_seed(1)
    tokens = torch.randint(0, vocab, (2, 13))
    with torch.no_grad():
        want = model(tokens[:, :-1]).logits
        # transformers' loss: its own shift, token t predicting token t + 1
        want_loss = model(tokens, labels=tokens).loss.item()
    diffs, loss_diffs = {}, {}
    for name, layout in layouts.items():
        losses: list[float] = []
        for rank, got in enumerate(_our_logits(tmp_path / name, converted, tokens, layout, losses)):
            assert got.shape[-1] % 128 == 0 and got.shape[-1] > vocab  # Megatron's padding
            assert torch.all(got[..., vocab:] == PADDED_LOGIT)  # padded ids out of the softmax
            diffs[f"{name}/rank{rank}"] = (got[..., :vocab] - want).abs().max().item()
        loss_diffs.update({f"{name}/rank{r}": abs(x - want_loss) for r, x in enumerate(losses)})
    print(f"max |our logits - transformers'| (scale {want.abs().max().item():.2f}): {diffs}")
    print(f"|our training-path loss - transformers' {want_loss:.6f}|: {loss_diffs}")
    assert max(diffs.values()) <= TOLERANCE, diffs
    assert want.abs().max().item() > 0.1  # a real signal, not all zeros
    assert max(loss_diffs.values()) <= LOSS_TOLERANCE, loss_diffs

    done = _moectl("convert", str(converted), str(back))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    again = type(model).from_pretrained(back, dtype=torch.float32)
    original, loaded = model.state_dict(), again.state_dict()
    assert set(loaded) == set(original)
    different = [k for k in original if not torch.equal(original[k], loaded[k])]
    assert different == [], different
    for field in (
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "num_experts_per_tok",
        "rms_norm_eps",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
    ):
        assert getattr(again.config, field) == getattr(model.config, field), field
    return {
        "log": first.stdout,
        "diffs": diffs,
        "converted": converted,
        "tensors": len(original),
        "tokens": tokens,
        "want": want,
    }


def test_mixtral_logits_match_transformers_in_ep1_and_ep2_and_convert_back(tmp_path, train_run):
    result = _convert_and_compare(tmp_path, _mixtral, {"ep1": EP1, "ep2": EP2})
    # embedding, lm_head, final norm; per layer q, k, v, o, router, experts (transformers 5
    # fuses them: gate_up_proj, down_proj) and two norms
    assert result["tensors"] == 3 + 2 * (4 + 1 + 2 + 2)
    # A finetune starts from the converted checkpoint (checkpoint.init_from) under EP2.
    config = result["converted"] / "config.yaml"
    tune = train_run(
        [
            "train.steps=2",
            "train.warmup_steps=0",
            "train.global_batch_size=4",
            "parallel.data=2",
            "parallel.expert=2",
            "train.precision=fp32",
            "model.seq_length=32",
        ],
        config=config,
    )
    assert tune.code == 0, tune.log()
    init = tune.event("init")
    assert (
        init["step"] == 0
        and Path(init["checkpoint"]) == result["converted"] / "checkpoints" / "step_00000000"
    )
    assert sorted(tune.losses) == [1, 2]
    # Step 1 trains on the batch the init event evaluated, with the converted weights.
    assert abs(tune.losses[1] - init["resume_loss"]) <= 1e-5 * init["resume_loss"], (
        tune.losses,
        init,
    )
    assert all(5.0 < loss < 10.0 for loss in tune.losses.values()), tune.losses


def test_qwen2_moe_logits_match_transformers_in_ep1_ep2_tp2_sp_and_convert_back(tmp_path):
    result = _convert_and_compare(
        tmp_path, _qwen2_moe, {"ep1": EP1, "ep2": EP2, "tp2_sp_ep2": TP2_SP_EP2}
    )
    yaml_text = (result["converted"] / "config.yaml").read_text()
    assert "shared_expert_gate: true" in yaml_text and "pre_softmax: true" in yaml_text
    assert "add_qkv_bias: true" in yaml_text and "tie_embeddings: true" in yaml_text


def test_qwen3_moe_logits_match_transformers_in_ep1_ep2_tp2_sp_and_convert_back(tmp_path):
    result = _convert_and_compare(
        tmp_path, _qwen3_moe, {"ep1": EP1, "ep2": EP2, "tp2_sp_ep2": TP2_SP_EP2}
    )
    yaml_text = (result["converted"] / "config.yaml").read_text()
    assert "qk_norm: true" in yaml_text and "kv_channels: 12" in yaml_text
    assert (
        "pre_softmax: false" in yaml_text and "layer_freq:\n    - 0\n    - 1\n    - 1" in yaml_text
    )


def test_olmoe_logits_match_transformers_in_ep1_ep2_tp2_sp_and_convert_back(tmp_path):
    result = _convert_and_compare(
        tmp_path, _olmoe, {"ep1": EP1, "ep2": EP2, "tp2_sp_ep2": TP2_SP_EP2}
    )
    yaml_text = (result["converted"] / "config.yaml").read_text()
    assert "qk_norm_scope: projection" in yaml_text and "pre_softmax: true" in yaml_text


def test_a_missing_tensor_is_refused_naming_it(tmp_path):
    from safetensors.torch import load_file, save_file

    _mixtral(tmp_path / "hf")
    tensors = load_file(tmp_path / "hf" / "model.safetensors")
    del tensors["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    save_file(tensors, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    done = _moectl("convert", str(tmp_path / "hf"), str(tmp_path / "out"))
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert (
        "tensor model.layers.1.block_sparse_moe.experts.2.w3.weight is missing (needed for "
        "decoder.layers.1.mlp.experts.local_experts.2.linear_fc1.weight)"
    ) in done.stderr
    # Nothing left behind: the same command refuses again for the same reason, not because
    # the output directory exists.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
    again = _moectl("convert", str(tmp_path / "hf"), str(tmp_path / "out"))
    assert again.returncode == 2 and "w3.weight is missing" in again.stderr, again.stderr


def test_phimoe_logits_match_transformers_in_ep1_ep2_and_convert_back(tmp_path):
    """Evaluation routes deterministically (SparseMixer-v2's top-2 with masked-softmax weights);
    a wide mask (router_jitter_noise 0.5) keeps several experts in play, so the weights matter:
    the same weights with a narrow mask miss by far more than the tolerance."""
    result = _convert_and_compare(tmp_path, _phimoe, {"ep1": EP1, "ep2": EP2})
    yaml_text = (result["converted"] / "config.yaml").read_text()
    for line in (
        "router: sparsemixer",
        "sparsemixer_jitter_eps: 0.5",
        "normalization: LayerNorm",
        "attention_output_bias: true",
        "output_layer_bias: true",
        "add_qkv_bias: true",
    ):
        assert line in yaml_text, line
    # (a checkpoint of this router refuses to load under another router: the structure check)
    [narrow] = _our_logits(
        tmp_path / "narrow",
        result["converted"],
        result["tokens"],
        (1, ["model.moe.sparsemixer_jitter_eps=0.01"]),
    )
    vocab = result["want"].shape[-1]
    assert (narrow[..., :vocab] - result["want"]).abs().max().item() > 100 * TOLERANCE


def test_deepseek_v3_logits_match_transformers_in_ep1_ep2_tp2_sp_and_convert_back(tmp_path):
    result = _convert_and_compare(
        tmp_path, _deepseek_v3, {"ep1": EP1, "ep2": EP2, "tp2_sp_ep2": TP2_SP_EP2}
    )
    yaml_text = (result["converted"] / "config.yaml").read_text()
    for line in (
        "attention: mla",
        "q_lora_rank: 24",
        "rope_type: yarn",
        "rotary_scaling_factor: 4.0",
        "mscale_all_dim: 1.0",
        "score_function: sigmoid",
        "expert_bias: true",
        "num_groups: 4",
        "group_topk: 2",
        "routed_scaling_factor: 2.5",
        "first_dense_layers: 1",
        "mtp_layers: 0",
    ):
        assert line in yaml_text, line
    assert (
        "not converted: 2 HF tensors with no place in our model (model.layers.3.eh_proj.weight"
        in result["log"]
    )
    # Each DeepSeek-specific setting (YaRN too) moves transformers' own logits on these weights
    # by far more than the tolerance (measured 0.74 to 1.35), so the match above checks each
    # mapping.
    model = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    unbiased = {
        k: torch.zeros_like(v) if k.endswith("e_score_correction_bias") else v
        for k, v in model.state_dict().items()
    }
    for change, weights in (
        ({"rope_interleave": False}, None),
        ({"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}, None),
        ({"n_group": 1, "topk_group": 1}, None),
        ({"routed_scaling_factor": 1.0}, None),
        ({}, unbiased),
    ):
        gap = _logits_gap(model, result, change, weights)
        assert gap > 100 * TOLERANCE, (change, gap)


def _logits_gap(model, result, change: dict, weights: dict | None) -> float:
    """max |transformers' logits - the converted model's reference| with ``change`` made to the
    config (or ``weights`` loaded in place of the model's)."""
    config = type(model.config).from_dict({**model.config.to_dict(), **change})
    variant = type(model)(config).eval()
    variant.load_state_dict(weights or model.state_dict())
    with torch.no_grad():
        got = variant(result["tokens"][:, :-1]).logits
    return (got - result["want"]).abs().max().item()


def test_deepseek_v2_logits_match_transformers_in_tp2_sp_ep2_and_convert_back(tmp_path):
    result = _convert_and_compare(tmp_path, _deepseek_v2, {"tp2_sp_ep2": TP2_SP_EP2})
    yaml_text = (result["converted"] / "config.yaml").read_text()
    for line in ("q_lora_rank: null", "pre_softmax: true", "shared_expert_ffn_hidden_size: 32"):
        assert line in yaml_text, line


def test_a_deepseek_v3_trained_with_mtp_is_written_without_it(tmp_path, train_run):
    """Our V3 twin with its multi-token prediction module, trained one step on one rank, written
    as DeepseekV3ForCausalLM: the MTP module's parameters (and its router's expert bias) are left
    out with a logged line, transformers loads every other tensor (none missing, none
    unexpected), and the expert bias the step moved is written as e_score_correction_bias."""
    import re

    tune = train_run(
        [
            "train.steps=1",
            "train.warmup_steps=0",
            "train.global_batch_size=2",
            "train.micro_batch_size=2",
            "parallel.data=1",
            "parallel.expert=1",
            "model.seq_length=32",
        ],
        config=REPO / "configs" / "tiny" / "deepseek_v3_tiny.yaml",
    )
    assert tune.code == 0, tune.log()
    done = _moectl("convert", str(tune.run_dir), str(tmp_path / "hf"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    skipped = re.search(r"not converted: (\d+) of our parameters under mtp\.", done.stdout)
    # enorm, hnorm, eh_proj, final norm; the layer's 2 norms, 5 attention projections and 2
    # latent norms, router and its expert bias, 16 experts x 2, the shared expert's 2
    assert skipped and int(skipped.group(1)) == 4 + 2 + 7 + 2 + 32 + 2, done.stdout[-2000:]
    model, info = transformers.DeepseekV3ForCausalLM.from_pretrained(
        tmp_path / "hf", dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert model.config.num_nextn_predict_layers == 0
    bias = model.model.layers[1].mlp.gate.e_score_correction_bias
    assert bias.abs().max().item() > 0, bias
