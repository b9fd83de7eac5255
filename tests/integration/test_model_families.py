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
    return {k: v for k, v in read_tensors(checkpoint).items()
            if k.split(".")[0] in ("embedding", "decoder", "output_layer")}


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
