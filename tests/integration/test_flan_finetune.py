"""Flan-MoE instruction finetuning of the tiny twin (configs/tiny/flan_moe_tiny.yaml) from a
tiny pretrained MoE: response-only loss, frozen parameters bit-identical, held-out response loss
lowered, EP1 == EP2 with expert dropout on, and the `moectl finetune` verb."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cluster import RunSpec, run_local
from moe_parallel.ckpt.inspect import read_tensors
from tests.conftest import REPO, TEST_DATA, TINY, Run, rel_diff

pytestmark = pytest.mark.integration

FLAN = REPO / "configs" / "tiny" / "flan_moe_tiny.yaml"
ONE_RANK = ["parallel.expert=1", "parallel.data=1"]


@pytest.fixture(scope="module")
def base(tmp_path_factory, data_cache) -> Path:
    """A tiny MoE pretrained for 10 steps (EP2): the run directory finetunes start from."""
    from moe_parallel.launch_run import launch_local, plan_train

    overrides = [
        *TEST_DATA,
        f"data.cache_dir={data_cache}",
        "log.tensorboard=false",
        "train.steps=10",
        "train.warmup_steps=2",
        "checkpoint.interval=null",
    ]
    launch = plan_train(TINY, overrides, str(tmp_path_factory.mktemp("base") / "runs"), None, None)
    assert launch_local(launch, stream=False) == 0, (
        launch.run_dir / "logs" / "rank0.log"
    ).read_text()
    return launch.run_dir


def _ckpt(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:08d}"


def _model(path: Path) -> dict:
    return {
        k: v
        for k, v in read_tensors(path).items()
        if k.split(".")[0] in ("embedding", "decoder", "output_layer")
    }


def test_prompt_labels_contribute_zero_loss_and_gradient(base, data_cache, tmp_path):
    from moe_parallel.launch_run import plan_train

    launch = plan_train(
        FLAN,
        [
            *TEST_DATA,
            f"data.cache_dir={data_cache}",
            *ONE_RANK,
            f"checkpoint.init_from={_ckpt(base, 10)}",
        ],
        str(tmp_path / "runs"),
        None,
        None,
    )
    entry = [
        sys.executable,
        str(REPO / "tests" / "integration" / "finetune_check.py"),
        str(launch.run_dir),
    ]
    code = run_local(RunSpec(run_dir=launch.run_dir, world_size=1, entry=entry), stream=False)
    assert code == 0, (launch.run_dir / "logs" / "rank0.log").read_text()[-3000:]
    check = json.loads((launch.run_dir / "check.json").read_text())
    assert 0 < check["loss_positions"] < check["positions"]  # prompts and responses both present
    assert check["prompt_labels_changed"] > 100
    # Every prompt label changed: the loss and all gradients are exactly the same.
    assert check["prompt_changed_loss"] == check["loss"]
    assert check["prompt_grads_identical"] and check["prompt_grad_max_diff"] == 0.0
    # One response label changed: both change.
    assert check["response_changed_loss"] != check["loss"]
    assert check["response_grad_max_diff"] > 1e-6
    # The tiny twin freezes the routers: they have no gradient.
    assert check["frozen"] == [f"decoder.layers.{i}.mlp.router.weight" for i in range(4)]
    # Expert dropout is active in training mode (the only train/eval difference of the model).
    assert check["eval_loss"] != check["loss"]


def test_moectl_finetune_lowers_held_out_loss_and_keeps_frozen_routers(base, data_cache, tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "launch.cli",
            "finetune",
            str(FLAN),
            *TEST_DATA,
            f"data.cache_dir={data_cache}",
            "log.tensorboard=false",
            "train.steps=12",
            "train.eval_interval=12",
            f"checkpoint.init_from={base}",
            "--runs",
            str(tmp_path),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run = Run(0, Path(done.stdout.split("run directory: ", 1)[1].splitlines()[0]))
    init = run.event("init")  # started from the base run's newest checkpoint (resolved)
    assert init["checkpoint"] == str(_ckpt(base, 10).resolve())
    evals = {r["step"]: r["valid_loss"] for r in run.records if r.get("event") == "eval"}
    assert sorted(evals) == [0, 12]
    assert run.steps[-1]["aux_loss"] > 0  # kept by the tiny twin (finetune.aux_loss: true)
    # Held-out response loss (held-out prompts, response tokens only) goes down clearly.
    assert evals[12] < evals[0] - 0.3, evals
    before, after = _model(_ckpt(base, 10)), _model(_ckpt(run.run_dir, 12))
    routers = [k for k in before if ".mlp.router." in k]
    assert len(routers) == 4
    for k in routers:
        assert before[k].equal(after[k]), k  # frozen: bit-identical
    assert not any(before[k].equal(after[k]) for k in before if k not in routers)
    # Frozen parameters have no optimizer state at all.
    optimizer_keys = [k for k in read_tensors(_ckpt(run.run_dir, 12)) if k.startswith("optimizer.")]
    assert optimizer_keys and not any(".mlp.router." in k for k in optimizer_keys)


def test_tiny_twin_same_losses_ep1_ep2_with_expert_dropout_and_frozen_experts(base, train_run):
    common = [
        "train.steps=5",
        f"checkpoint.init_from={_ckpt(base, 10)}",
        "finetune.freeze=[experts]",
        "finetune.expert_dropout=0.2",
        "finetune.aux_loss=false",
    ]
    ep2 = train_run(common, config=FLAN)
    assert ep2.code == 0, ep2.log()
    ep1 = train_run([*common, *ONE_RANK], config=FLAN)
    assert ep1.code == 0, ep1.log()
    for step in range(1, 6):
        assert rel_diff(ep1.losses[step], ep2.losses[step]) < 1e-4, (step, ep1.losses, ep2.losses)
    assert "aux_loss" not in ep2.steps[-1]  # finetune.aux_loss=false: no balancing loss
    before, after = _model(_ckpt(base, 10)), _model(_ckpt(ep2.run_dir, 5))
    experts = [k for k in before if ".mlp.experts." in k]
    assert len(experts) == 8
    for k in experts:
        assert before[k].equal(after[k]), k
    assert not any(before[k].equal(after[k]) for k in before if k not in experts)
