"""Mixture-of-Depths (arXiv 2404.02258, model/layers/mixture_of_depths.py): token counts of the
routed blocks, capacity 1 against the plain Megatron block, causal choices in evaluation, the
predictor's accuracy (one CPU rank, in a child process: tests/unit/mod_layer_checks.py); the
config rules and the parameter count."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from moe_parallel.config import ConfigError, load_config
from moe_parallel.plan.params import count_parameters
from tests.conftest import REPO

TWIN = REPO / "configs" / "tiny" / "mod_moe_tiny.yaml"


@pytest.fixture(scope="module")
def checks() -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.unit.mod_layer_checks"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("MOD_CHECKS ")][-1]
    return json.loads(line.removeprefix("MOD_CHECKS "))


@pytest.mark.parametrize("capacity,k", [(0.125, 16), (0.1, 13), (0.5, 64)])
def test_routed_block_processes_exactly_ceil_capacity_tokens_per_sequence(checks, capacity, k):
    c = checks[f"capacity_{capacity}"]
    assert c["expected_k"] == k
    assert c["attention_input"] == [k, 2]  # [K, B]: attention sees K tokens of each sequence
    assert c["mlp_input"] == [k, 2]  # so does the MoE layer
    assert c["chosen_per_sequence"] == [k, k]
    assert c["chosen_are_router_top_k"]
    assert c["skipped_tokens_unchanged"]  # bit for bit: the residual alone
    assert c["chosen_tokens_changed"]


def test_capacity_one_is_the_plain_block_scaled_by_the_router(checks):
    c = checks["capacity_one"]
    assert c["same_block_weights"]
    assert c["max_abs_diff"] <= 1e-6 * c["scale"]


@pytest.mark.parametrize("causal", ["predictor", "router_bce"])
def test_evaluation_choice_uses_no_future_token(checks, causal):
    c = checks["causal"][causal]
    assert c["eval_same_choice_before_cut"]
    assert c["eval_logits_before_cut_max_diff"] <= 1e-5
    assert c["eval_logits_after_cut_differ"]  # the change did reach the model
    assert 0 < c["eval_chosen_fraction"] < 1
    # Training's top-k is not causal: the same change moves earlier tokens' choices.
    assert c["train_topk_changed_before_cut"]


def test_predictor_learns_top_k_membership_from_the_layers_own_aux_loss(checks):
    c = checks["predictor"]
    assert c["recall_before"] < 0.7  # untrained, it does not know the chosen tokens
    assert c["held_out_accuracy"] >= 0.95  # the paper reports 97-99%
    assert c["held_out_recall"] >= 0.75  # not by predicting "skipped" (87.5% of tokens) always


PREDICTOR = ["mod_predictor.fc1.bias", "mod_predictor.fc1.weight"]
PREDICTOR += ["mod_predictor.fc2.bias", "mod_predictor.fc2.weight"]


@pytest.mark.parametrize(
    "causal,reaches", [("predictor", PREDICTOR), ("router_bce", ["input", "mod_router.weight"])]
)
def test_aux_loss_reaches_only_its_own_weights_and_not_the_output(checks, causal, reaches):
    c = checks["aux_loss_path"][causal]
    assert c["rerun_changes"] == []  # a rerun of the same step gives the same gradients
    assert c["output_unchanged"]  # the forward value is the block's alone
    # predictor: the LM loss's gradients are untouched (the paper: no hit to the LM loss);
    # router_bce: the loss trains the router and, through it, the layers below (the paper: a
    # small hit to the LM loss), and nothing else in the block.
    assert c["grads_changed_by_aux_loss"] == reaches
    assert c["aux_grads_nonzero"] == reaches


def test_mod_needs_the_whole_sequence_on_each_rank():
    with pytest.raises(ConfigError, match="model.mod .*sequence_parallel=false"):
        load_config(
            TWIN,
            [
                "parallel.tensor=2",
                "parallel.sequence_parallel=true",
                "parallel.expert=1",
                "parallel.data=1",
            ],
        )
    with pytest.raises(ConfigError, match="parallel.context=1"):
        load_config(TWIN, ["parallel.context=2", "parallel.expert=1", "parallel.data=1"])
    with pytest.raises(ConfigError, match="model.mod.layer_freq has 3 entries"):
        load_config(TWIN, ["model.mod.layer_freq=[0,1,1]"])
    with pytest.raises(ConfigError, match="capacity"):
        load_config(TWIN, ["model.mod.capacity=0"])


def test_routed_layers_and_parameter_count():
    cfg = load_config(TWIN)
    assert cfg.model.mod.routed_layers(4) == [1, 3]
    assert load_config(TWIN, ["model.mod.layer_freq=[1,0,0,1]"]).model.mod.routed_layers(4) == [
        0,
        3,
    ]
    with_mod = count_parameters(cfg.model, 512)
    without = count_parameters(load_config(TWIN, ["model.mod=null"]).model, 512)
    d, h = 64, 16
    per_layer = d + (d * h + h) + (h + 1)  # router w, predictor fc1 and fc2 with biases
    assert with_mod.total - without.total == 2 * per_layer
    bce = count_parameters(load_config(TWIN, ["model.mod.causal=router_bce"]).model, 512)
    assert bce.total - without.total == 2 * d
    # FLOPs: the routed blocks' matmuls at 1/8, their attention at 1/64.
    flops = with_mod.flops_per_token(128, 4, 64)
    assert flops < 0.8 * without.flops_per_token(128, 4, 64)
    assert with_mod.attention_layers == pytest.approx(2 + 2 / 64)
