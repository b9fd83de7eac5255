"""Parallel equivalence: the same tiny MoE (fp32, dropless, same seed, data and global batch)
trained 5 steps under each layout gives the 1-rank run's losses, step for step."""

from __future__ import annotations

import pytest

from tests.conftest import rel_diff

pytestmark = pytest.mark.parallel

STEPS = [
    "train.steps=5",
    "train.warmup_steps=2",
    "checkpoint.save_at_end=false",
    "train.precision=fp32",
]
ONE_RANK = ["parallel.expert=1", "parallel.data=1"]
LAYOUTS = {
    "EP2": ["parallel.expert=2", "parallel.data=2"],
    "TP2+SP,EP2": [
        "parallel.tensor=2",
        "parallel.sequence_parallel=true",
        "parallel.expert=2",
        "parallel.data=2",
    ],
    "PP2,EP2": ["parallel.pipeline=2", "parallel.expert=2", "parallel.data=2"],
    "TP2,PP2": [
        "parallel.tensor=2",
        "parallel.sequence_parallel=true",
        "parallel.pipeline=2",
        "parallel.expert=1",
        "parallel.data=1",
    ],
    "PP2xVPP2,EP2": [
        "parallel.pipeline=2",
        "parallel.virtual_pipeline=2",
        "parallel.expert=2",
        "parallel.data=2",
    ],
}


# A second model exercising the other options: allgather dispatcher, dense and MoE layers mixed,
# a shared expert, LayerNorm, no GQA.
VARIANT = [
    "model.moe.dispatcher=allgather",
    "model.moe.layer_freq=[0,1,1,0]",
    "model.moe.shared_expert_ffn_hidden_size=64",
    "model.normalization=LayerNorm",
    "model.num_query_groups=null",
]
VARIANT_LAYOUTS = {k: LAYOUTS[k] for k in ("EP2", "TP2+SP,EP2", "PP2,EP2")}


def _reference_run(tmp_path_factory, data_cache, extra):
    from moe_parallel.launch_run import launch_local, plan_train
    from tests.conftest import TEST_DATA, TINY, Run

    runs = tmp_path_factory.mktemp("reference-runs")
    launch = plan_train(
        TINY,
        [
            *TEST_DATA,
            f"data.cache_dir={data_cache}",
            "log.tensorboard=false",
            *STEPS,
            *ONE_RANK,
            *extra,
        ],
        str(runs),
        None,
        nproc=None,
    )
    run = Run(launch_local(launch, stream=False), launch.run_dir)
    assert run.code == 0, run.log()
    assert sorted(run.losses) == [1, 2, 3, 4, 5]
    return run


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_cache):
    return _reference_run(tmp_path_factory, data_cache, [])


@pytest.fixture(scope="module")
def variant_reference(tmp_path_factory, data_cache):
    return _reference_run(tmp_path_factory, data_cache, VARIANT)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_one_rank(name, reference, train_run):
    _compare(name, train_run([*STEPS, *LAYOUTS[name]]), reference)


@pytest.mark.parametrize("name", list(VARIANT_LAYOUTS))
def test_variant_layout_matches_one_rank(name, variant_reference, train_run):
    _compare(name, train_run([*STEPS, *VARIANT_LAYOUTS[name], *VARIANT]), variant_reference)


def _compare(name, run, reference):
    assert run.code == 0, run.log()
    ref = reference.steps
    got = run.steps
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5]
    for a, b in zip(got, ref):
        assert rel_diff(a["loss"], b["loss"]) < 1e-4, (name, a["step"], a["loss"], b["loss"])
        assert rel_diff(a["grad_norm"], b["grad_norm"]) < 1e-3, (name, a["step"])
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-12)
        # Expert load is a property of the model and data, not of the layout.
        assert a["moe/tokens_per_expert"] == b["moe/tokens_per_expert"], (name, a["step"])
    # The run must actually learn something, or equal losses would prove little.
    assert got[-1]["loss"] < got[0]["loss"]
