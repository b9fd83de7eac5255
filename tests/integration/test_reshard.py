"""Resuming under another layout: model, optimizer moments and step, LR schedule and data
position all carry over, so training continues as if the layout had never changed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moe_parallel.ckpt.inspect import read_tensors
from tests.conftest import rel_diff

pytestmark = pytest.mark.integration

TEN = ["train.steps=10", "train.warmup_steps=2", "checkpoint.interval=5", "train.precision=fp32"]
EP2 = ["parallel.expert=2", "parallel.data=2"]
CHANGES = {
    "EP2->EP1": (EP2, ["parallel.expert=1", "parallel.data=1"]),
    "TP2->TP1": (
        [
            "parallel.tensor=2",
            "parallel.sequence_parallel=true",
            "parallel.expert=1",
            "parallel.data=1",
        ],
        ["parallel.expert=1", "parallel.data=1"],
    ),
    "PP2->PP1": (["parallel.pipeline=2", *EP2], EP2),
    "DP2->DP1": (
        ["parallel.expert=1", "parallel.data=2"],
        ["parallel.expert=1", "parallel.data=1"],
    ),
    "DistOpt on->off": (EP2, [*EP2, "parallel.distributed_optimizer=false"]),
}


def _step5(run) -> Path:
    return run.run_dir / "checkpoints" / "step_00000005"


@pytest.fixture(scope="module")
def sources():
    return {}


@pytest.mark.parametrize("change", list(CHANGES))
def test_resume_under_new_layout_continues_the_run(change, train_run, sources):
    before, after = CHANGES[change]
    key = tuple(before)
    if key not in sources:
        sources[key] = train_run([*TEN, *before])
    source = sources[key]
    assert source.code == 0, source.log()
    if change == "DP2->DP1":  # each data-parallel rank saved its own slice of the moments
        writers = _optimizer_writers(_step5(source), "optimizer.exp_avg.")
        assert writers == {0, 1}, writers

    # 1. Re-saved under the new layout without training: every tensor, optimizer moments and
    #    fp32 main weights included, is the same global tensor as before.
    resaved = train_run([*TEN, *after, "train.steps=5", f"checkpoint.resume={_step5(source)}"])
    assert resaved.code == 0, resaved.log()
    old, new = read_tensors(_step5(source)), read_tensors(_step5(resaved))
    assert sorted(old) == sorted(new)
    assert any(k.startswith("optimizer.exp_avg_sq.") and "experts" in k for k in old)
    for name in old:
        same = (
            torch.equal(old[name], new[name])
            if torch.is_tensor(old[name])
            else old[name] == new[name]
        )
        assert same, f"{change}: {name} changed in the reshard"

    # 2. Trained on from step 5 under the new layout: the same losses as the source's steps 6-10.
    resumed = train_run([*TEN, *after, f"checkpoint.resume={_step5(source)}"])
    assert resumed.code == 0, resumed.log()
    for step in range(6, 11):
        assert rel_diff(resumed.losses[step], source.losses[step]) < 1e-4, (change, step)
        assert resumed.steps[step - 6]["lr"] == pytest.approx(source.steps[step - 1]["lr"])
    assert rel_diff(resumed.event("resume")["resume_loss"], source.losses[6]) < 1e-5


def _optimizer_writers(path: Path, prefix: str) -> set[int]:
    """The ranks whose files hold chunks of tensors named ``prefix*`` (``__<rank>_<n>.distcp``)."""
    from moe_parallel.ckpt.manifest import read_manifest

    return {
        int(c["file"].split("_")[2])
        for c in read_manifest(path)["chunks"]
        if c["tensor"].startswith(prefix)
    }


def test_reset_optimizer_keeps_weights_but_not_moments(train_run, sources):
    key = tuple(EP2)
    if key not in sources:
        sources[key] = train_run([*TEN, *EP2])
    source = sources[key]
    run = train_run(
        [
            *TEN,
            "parallel.expert=1",
            "parallel.data=1",
            "train.steps=7",
            f"checkpoint.resume={_step5(source)}",
            "checkpoint.on_layout_change=reset_optimizer",
        ]
    )
    assert run.code == 0, run.log()
    assert rel_diff(run.losses[6], source.losses[6]) < 1e-5  # same weights, same batch
    assert rel_diff(run.losses[7], source.losses[7]) > 1e-4  # moments restarted from zero
    # ... but from the loaded weights (an optimizer stepping stale weights would put step 7
    # back near the untrained loss).
    assert abs(run.losses[7] - source.losses[7]) < 0.05, (run.losses[7], source.losses[7])


def test_checkpoint_of_another_model_is_refused(train_run, sources):
    key = tuple(EP2)
    if key not in sources:
        sources[key] = train_run([*TEN, *EP2])
    run = train_run([*TEN, *EP2, "model.num_layers=2", f"checkpoint.resume={_step5(sources[key])}"])
    assert run.code != 0
    assert "model.num_layers: checkpoint 4, config 2" in run.log()


def test_eval_interval_reports_held_out_loss(train_run):
    run = train_run(
        [
            "train.steps=6",
            "train.warmup_steps=1",
            "train.eval_interval=3",
            "train.eval_steps=2",
            "data.split=90,10,0",
        ]
    )
    assert run.code == 0, run.log()
    evals = {r["step"]: r["valid_loss"] for r in run.records if r.get("event") == "eval"}
    assert sorted(evals) == [3, 6]
    assert evals[6] < evals[3] < 8.0  # learning shows on held-out documents too
