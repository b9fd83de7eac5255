"""Tiny twins of the model families: the same losses under EP1 and EP2, and parameter counts
equal to the tensors Megatron-core actually allocates (read back from their checkpoints)."""

from __future__ import annotations

import pytest

from moe_parallel.ckpt.inspect import read_tensors
from moe_parallel.config import load_config
from moe_parallel.plan.params import count_parameters
from tests.conftest import REPO, rel_diff

pytestmark = pytest.mark.integration

DEEPSEEK = REPO / "configs" / "tiny" / "deepseek_moe_tiny.yaml"
FIVE = ["train.steps=5", "train.warmup_steps=1", "checkpoint.interval=null"]


def model_tensors(checkpoint) -> dict:
    return {
        k: v
        for k, v in read_tensors(checkpoint).items()
        if k.split(".")[0] in ("embedding", "decoder", "output_layer")
    }


def test_deepseek_twin_same_losses_ep1_ep2_and_counts_match_the_checkpoint(train_run):
    ep2 = train_run(FIVE, config=DEEPSEEK)
    assert ep2.code == 0, ep2.log()
    ep1 = train_run([*FIVE, "parallel.expert=1", "parallel.data=1"], config=DEEPSEEK)
    assert ep1.code == 0, ep1.log()
    for step in range(1, 6):
        assert rel_diff(ep1.losses[step], ep2.losses[step]) < 1e-4, step
    tensors = model_tensors(ep2.run_dir / "checkpoints" / "step_00000005")
    vocab = tensors["embedding.word_embeddings.weight"].shape[0]
    cfg = load_config(ep2.run_dir / "config.yaml")
    assert sum(t.numel() for t in tensors.values()) == count_parameters(cfg.model, vocab).total
    # The structure is DeepSeekMoE's: layer 0 dense, shared experts beside 8 routed ones.
    assert "decoder.layers.0.mlp.linear_fc1.weight" in tensors
    assert any(".mlp.shared_experts." in k for k in tensors)


GRIN = REPO / "configs" / "tiny" / "grin_moe_tiny.yaml"
YUAN = REPO / "configs" / "tiny" / "yuan2_m32_tiny.yaml"
ONE_RANK = ["parallel.expert=1", "parallel.data=1"]
TP2_SP = [
    "parallel.tensor=2",
    "parallel.sequence_parallel=true",
    "parallel.expert=1",
    "parallel.data=1",
]


def _same_losses(a, b, steps=5):
    for step in range(1, steps + 1):
        assert rel_diff(a.losses[step], b.losses[step]) < 1e-4, (step, a.losses, b.losses)


def _counts_match(run):
    tensors = model_tensors(run.run_dir / "checkpoints" / "step_00000005")
    vocab = tensors["embedding.word_embeddings.weight"].shape[0]
    cfg = load_config(run.run_dir / "config.yaml")
    assert sum(t.numel() for t in tensors.values()) == count_parameters(cfg.model, vocab).total
    return tensors


def test_grin_twin_sparsemixer_same_losses_ep1_ep2_tp2sp(train_run):
    """SparseMixer-v2 samples its experts; its draws are keyed by token (routers/noise.py), so
    the layouts still agree step for step."""
    ep2 = train_run(FIVE, config=GRIN)
    assert ep2.code == 0, ep2.log()
    ep1 = train_run([*FIVE, *ONE_RANK], config=GRIN)
    assert ep1.code == 0, ep1.log()
    tp2 = train_run([*FIVE, *TP2_SP], config=GRIN)
    assert tp2.code == 0, tp2.log()
    _same_losses(ep1, ep2)
    _same_losses(ep1, tp2)
    tensors = _counts_match(ep2)
    # GRIN's structure: LayerNorm with bias, biases on q/k/v, o and the LM head, none in MLPs.
    assert "output_layer.bias" in tensors
    assert "decoder.layers.0.self_attention.linear_proj.bias" in tensors
    assert "decoder.layers.0.self_attention.linear_qkv.bias" in tensors
    assert not any(k.endswith("linear_fc1.bias") for k in tensors)


def test_yuan_twin_attention_router_lfa_same_losses_ep1_ep2_tp2sp(train_run):
    ep2 = train_run(FIVE, config=YUAN)
    assert ep2.code == 0, ep2.log()
    ep1 = train_run([*FIVE, *ONE_RANK], config=YUAN)
    assert ep1.code == 0, ep1.log()
    tp2 = train_run([*FIVE, *TP2_SP], config=YUAN)
    assert tp2.code == 0, tp2.log()
    _same_losses(ep1, ep2)
    _same_losses(ep1, tp2)
    tensors = _counts_match(ep2)
    router = tensors["decoder.layers.0.mlp.router.weight"]
    assert tuple(router.shape[-2:]) == (3 * 8, 64)  # Q, K and V over 8 experts
    assert tuple(
        tensors["decoder.layers.0.self_attention.linear_qkv.filter.conv1.weight"].shape[-4:]
    ) == (32, 64, 2, 1)
