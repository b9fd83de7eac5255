"""Mixture-of-Depths twin (MoDE: MoD routing around MoE blocks) trained for real: the same
losses and held-out losses under EP1 and EP2 (evaluation routes with the causal predictor), the
dense variant under TP2 without sequence parallelism equal to TP1, and the parameter count equal
to the checkpoint's tensors (routers and predictors included)."""

from __future__ import annotations

import pytest

from tests.conftest import REPO, rel_diff
from tests.integration.test_model_families import FIVE, _counts_match, _same_losses

pytestmark = pytest.mark.integration

MOD = REPO / "configs" / "tiny" / "mod_moe_tiny.yaml"
WITH_EVAL = [*FIVE, "train.eval_interval=5", "train.eval_steps=1", "data.split=90,10,0"]
ONE_RANK = ["parallel.expert=1", "parallel.data=1"]


def test_mode_twin_same_losses_ep1_ep2_and_counts_match_the_checkpoint(train_run):
    ep2 = train_run(WITH_EVAL, config=MOD)
    assert ep2.code == 0, ep2.log()
    ep1 = train_run([*WITH_EVAL, *ONE_RANK], config=MOD)
    assert ep1.code == 0, ep1.log()
    _same_losses(ep1, ep2)
    assert rel_diff(ep1.event("eval")["valid_loss"], ep2.event("eval")["valid_loss"]) < 1e-4
    tensors = _counts_match(ep2)
    assert tuple(tensors["decoder.layers.1.mod_router.weight"].shape[-2:]) == (1, 64)
    assert tuple(tensors["decoder.layers.3.mod_predictor.fc1.weight"].shape[-2:]) == (16, 64)
    assert not any(k.startswith("decoder.layers.0.mod_") for k in tensors)  # layer 0 is full
    assert "decoder.layers.1.mlp.router.weight" in tensors  # the routed block's MLP is MoE


def test_dense_mod_tp2_without_sequence_parallelism_equals_tp1(train_run):
    dense = ["model.moe=null", "parallel.expert=1"]
    tp1 = train_run([*FIVE, *dense, "parallel.data=1"], config=MOD)
    assert tp1.code == 0, tp1.log()
    tp2 = train_run([*FIVE, *dense, "parallel.tensor=2", "parallel.data=1"], config=MOD)
    assert tp2.code == 0, tp2.log()
    _same_losses(tp1, tp2)


def test_mode_twin_resumes_from_its_checkpoint_with_the_same_losses(train_run):
    """The routers and predictors (saved per routed layer) come back: steps 3-4 resumed from
    step 2's checkpoint equal the uninterrupted run's."""
    four = ["train.steps=4", "train.warmup_steps=1", "checkpoint.interval=2"]
    straight = train_run(four, config=MOD)
    assert straight.code == 0, straight.log()
    resumed = train_run(
        [*four, f"checkpoint.resume={straight.run_dir / 'checkpoints' / 'step_00000002'}"],
        config=MOD,
    )
    assert resumed.code == 0, resumed.log()
    for step in (3, 4):
        assert rel_diff(resumed.losses[step], straight.losses[step]) < 1e-6, (step, resumed.losses)
