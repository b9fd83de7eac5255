"""Parallel equivalence: the same tiny MoE (fp32, dropless, same seed, data and global batch)
trained 5 steps under each layout gives the 1-rank run's losses, step for step. Each run also
reports how Megatron ran it (event "pipeline": every rank's model chunks and schedule), checked
against what the layout asks for: a virtual pipeline lost on the way would give the same losses.
"""

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
    # Expert tensor parallelism other than TP, without expert parallelism: the experts' own
    # data-parallel group differs from the dense one (model/megatron_fixes.py).
    "ETP2": ["parallel.expert_tensor=2", "parallel.expert=1", "parallel.data=2"],
    "TP2+SP,ETP1": [
        "parallel.tensor=2",
        "parallel.sequence_parallel=true",
        "parallel.expert_tensor=1",
        "parallel.expert=1",
        "parallel.data=1",
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

# The global load-balancing loss (arXiv 2501.11873; Megatron's global_aux_loss) counts tokens over
# the data-parallel ranks' current micro-batches together: D ranks with micro-batches of B
# samples are one rank with micro-batches of D x B, which is the reference they are compared to.
GLOBAL = ["model.moe.load_balancing=global_aux_loss"]
GLOBAL_REFERENCE = ["train.micro_batch_size=4"]
GLOBAL_LAYOUTS = {
    "EP2": [*LAYOUTS["EP2"], "train.micro_batch_size=2"],
    "TP2+SP,EP2,ETP1": [
        "parallel.tensor=2",
        "parallel.sequence_parallel=true",
        "parallel.expert=2",
        "parallel.expert_tensor=1",
        "parallel.data=1",
        "train.micro_batch_size=4",
    ],
}


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


@pytest.fixture(scope="module")
def global_reference(tmp_path_factory, data_cache):
    return _reference_run(tmp_path_factory, data_cache, [*GLOBAL, *GLOBAL_REFERENCE])


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_one_rank(name, reference, train_run):
    _compare(name, train_run([*STEPS, *LAYOUTS[name]]), reference, LAYOUTS[name])


@pytest.mark.parametrize("name", list(VARIANT_LAYOUTS))
def test_variant_layout_matches_one_rank(name, variant_reference, train_run):
    layout = VARIANT_LAYOUTS[name]
    _compare(name, train_run([*STEPS, *layout, *VARIANT]), variant_reference, layout)


@pytest.mark.parametrize("name", list(GLOBAL_LAYOUTS))
def test_global_aux_loss_layout_matches_one_rank(name, global_reference, train_run):
    layout = GLOBAL_LAYOUTS[name]
    run = train_run([*STEPS, *layout, *GLOBAL])
    _compare(name, run, global_reference, layout)
    for a, b in zip(run.steps, global_reference.steps):
        key = "moe/global_load_balancing_loss"
        assert rel_diff(a[key], b[key]) < 1e-5, (name, a["step"], a[key], b[key])


def _expected_pipeline(layout: list[str]) -> tuple[int, int, str]:
    """(ranks, model chunks per rank, Megatron's schedule) that the layout's overrides ask for."""
    values = dict(item.split("=", 1) for item in layout)
    ranks = 1
    for size in ("tensor", "pipeline", "context", "data"):
        ranks *= int(values.get(f"parallel.{size}", 1))
    if "parallel.virtual_pipeline" in values:
        chunks = int(values["parallel.virtual_pipeline"])
        return ranks, chunks, "forward_backward_pipelining_with_interleaving"
    if int(values.get("parallel.pipeline", 1)) > 1:
        return ranks, 1, "forward_backward_pipelining_without_interleaving"
    return ranks, 1, "forward_backward_no_pipelining"


def _compare(name, run, reference, layout):
    assert run.code == 0, run.log()
    ranks, chunks, schedule = _expected_pipeline(layout)
    pipeline = run.event("pipeline")
    assert pipeline["model_chunks"] == [chunks] * ranks, (name, pipeline)
    assert pipeline["schedule"] == [schedule] * ranks, (name, pipeline)
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


def test_the_interleaved_layout_asks_for_two_chunks_on_each_of_four_ranks():
    assert _expected_pipeline(LAYOUTS["PP2xVPP2,EP2"]) == (
        4,
        2,
        "forward_backward_pipelining_with_interleaving",
    )
