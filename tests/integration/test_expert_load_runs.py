"""Expert load on real 2-rank tiny runs with forced routers (test-only faults ``route_one`` and
``route_uniform``, which set the routers' logits): load imbalance, router entropy, dead experts
in metrics.jsonl and the log."""

from __future__ import annotations

import math

import pytest

pytestmark = pytest.mark.integration

EXPERTS, LAYERS, TOKENS = 4, 4, 8 * 128  # moe_tiny: 4 experts, 4 MoE layers, 8 x 128 tokens
COMMON = ["train.warmup_steps=2", "checkpoint.interval=null", "checkpoint.save_at_end=false"]


def softmax_entropy(logits: list[float]) -> float:
    z = sum(math.exp(x) for x in logits)
    return -sum(math.exp(x) / z * (x - math.log(z)) for x in logits)


def tensorboard_scalars(folder) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def test_router_sending_every_token_to_one_expert(train_run):
    run = train_run(
        [
            *COMMON,
            "train.steps=5",
            "model.moe.top_k=1",
            "model.moe.pre_softmax=true",
            "log.tensorboard=true",
            "monitor.dead_expert_steps=3",
        ],
        env={"MOE_PARALLEL_FAULT": "route_one:expert=2"},
    )
    assert run.code == 0, run.log()
    steps = run.steps
    assert len(steps) == 5
    others = [0, 1, 3]
    for r in steps:
        layers = [str(i) for i in range(LAYERS)]
        assert sorted(r["moe/imbalance"]) == layers
        for layer in layers:
            assert r["moe/tokens_per_expert"][layer] == [0.0, 0.0, float(TOKENS), 0.0]
            assert r["moe/imbalance"][layer] == pytest.approx(EXPERTS, abs=1e-12)
            # the forced logits are 10 for expert 2, 0 for the others
            assert r["moe/router_entropy"][layer] == pytest.approx(
                softmax_entropy([0.0, 0.0, 10.0, 0.0]), abs=1e-9
            )
        dead = {layer: others for layer in layers} if r["step"] >= 3 else {}
        assert r["moe/dead_experts"] == dead, r
        assert r["moe/dead_expert_count"] == {layer: len(dead.get(layer, [])) for layer in layers}
    events = [e for e in run.records if e.get("event") == "dead_experts"]
    assert [(e["state"], e["step"]) for e in events] == [("start", 3)]
    assert events[0]["experts"] == {str(i): others for i in range(LAYERS)}
    scalars = tensorboard_scalars(run.run_dir / "tensorboard")
    for layer in range(LAYERS):
        assert scalars[f"moe/dead_expert_count/layer_{layer}"] == {1: 0, 2: 0, 3: 3, 4: 3, 5: 3}
        assert scalars[f"moe/imbalance/layer_{layer}"] == {
            s: pytest.approx(EXPERTS) for s in range(1, 6)
        }
        assert set(scalars[f"moe/router_entropy/layer_{layer}"]) == set(range(1, 6))
    log = run.log(0)
    assert log.count("DEAD EXPERTS at step 3") == LAYERS
    assert "DEAD EXPERTS at step 3: layer 0 experts [0, 1, 3] got no token for 3 steps" in log


def test_uniform_router_is_balanced(train_run):
    run = train_run(
        [*COMMON, "train.steps=3", "monitor.dead_expert_steps=1"],
        env={"MOE_PARALLEL_FAULT": "route_uniform"},
    )
    assert run.code == 0, run.log()
    steps = run.steps
    assert len(steps) == 3
    for r in steps:
        for layer in map(str, range(LAYERS)):
            # top-2 of 4: every expert gets 2 x 1024 / 4 tokens
            assert r["moe/tokens_per_expert"][layer] == [2 * TOKENS / EXPERTS] * EXPERTS
            assert r["moe/imbalance"][layer] == pytest.approx(1.0, abs=1e-12)
            assert r["moe/router_entropy"][layer] == pytest.approx(math.log(EXPERTS), abs=1e-5)
            assert r["moe/dead_expert_count"][layer] == 0
        assert r["moe/dead_experts"] == {}
    assert not [e for e in run.records if e.get("event") == "dead_experts"]
    assert "DEAD EXPERTS" not in run.log(0)


def test_monitoring_off_adds_nothing_but_keeps_the_loads(train_run):
    """monitor.enabled=false: token counts and imbalance stay; no entropy, dead experts or
    per-rank times."""
    run = train_run([*COMMON, "train.steps=3", "monitor.enabled=false"])
    assert run.code == 0, run.log()
    for r in run.steps:
        assert "moe/imbalance" in r and "moe/tokens_per_expert" in r
        for key in ("moe/router_entropy", "moe/dead_experts", "stragglers", "rank_compute_s"):
            assert key not in r
