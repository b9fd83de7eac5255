"""Sparse upcycling and PESC end to end: a dense checkpoint trained on 2 ranks becomes an MoE
checkpoint (moectl upcycle), checked tensor by tensor, by its logits and by the first training
loss under EP2; PESC trains only adapters and routers; the Camelidae twin gives the same losses
under EP1 and EP2 and its parameter count is the checkpoint's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cluster import RunSpec, run_local
from moe_parallel.ckpt.inspect import read_tensors
from moe_parallel.config import load_config
from moe_parallel.launch_run import launch_local, plan_train
from moe_parallel.plan.params import count_parameters
from tests.conftest import REPO, TEST_DATA, Run, rel_diff

pytestmark = pytest.mark.integration

DENSE = REPO / "configs" / "tiny" / "dense_tiny.yaml"
TWIN = REPO / "configs" / "tiny" / "camelidae_tiny.yaml"
STEP0 = Path("checkpoints") / "step_00000000"


def model_tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    return {
        k: v
        for k, v in read_tensors(checkpoint).items()
        if k.split(".")[0] in ("embedding", "decoder", "output_layer")
    }


@pytest.fixture(scope="module")
def dense(tmp_path_factory, data_cache):
    """A dense tiny checkpoint (3 steps, DP2) and the dense model's first loss trained from it."""
    root = tmp_path_factory.mktemp("dense")
    common = [
        *TEST_DATA,
        f"data.cache_dir={data_cache}",
        "log.tensorboard=false",
        "checkpoint.interval=null",
    ]
    seed = plan_train(
        DENSE, [*common, "train.steps=3", "train.warmup_steps=1"], str(root / "runs"), None, None
    )
    assert launch_local(seed, stream=False) == 0, (seed.run_dir / "logs" / "rank0.log").read_text()
    checkpoint = seed.run_dir / "checkpoints" / "step_00000003"
    again = plan_train(
        DENSE,
        [*common, "train.steps=1", "train.warmup_steps=0", f"checkpoint.init_from={checkpoint}"],
        str(root / "runs"),
        None,
        None,
    )
    assert launch_local(again, stream=False) == 0
    return checkpoint, Run(0, again.run_dir).losses[1]


def dense_tensor(src: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """``decoder.layers.I.rest`` of a dense checkpoint, which stacks its (uniform) layers under
    ``decoder.layers.rest`` with the layer as the first axis."""
    if name in src:
        return src[name]
    head, index, rest = name.split(".", 2)[0], name.split(".")[2], name.split(".", 3)[3]
    return src[f"{head}.layers.{rest}"][int(index)]


def moectl(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "launch.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def first_loss_under_ep2(train_run, out: Path, extra=()) -> Run:
    run = train_run(
        ["parallel.expert=2", "train.steps=1", "train.warmup_steps=0", *extra],
        config=out / "config.yaml",
    )
    assert run.code == 0, run.log()
    assert run.event("init")["step"] == 0
    return run


def test_sparse_upcycling_copies_the_ffn_and_keeps_the_dense_output(dense, train_run, tmp_path):
    checkpoint, dense_loss = dense
    out = tmp_path / "upcycled"
    done = moectl("upcycle", str(checkpoint), str(out), "--experts", "4", "--top-k", "2")
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((out / "upcycle_report.json").read_text())
    # Identical experts, renormalised top-2 weights: the logits are the dense model's.
    assert report["logits_max_abs_diff"] <= 1e-5 * report["logits_max_abs"], report
    assert report["fresh"] == [f"decoder.layers.{i}.mlp.router.weight" for i in range(4)]

    moe, src = model_tensors(out / STEP0), model_tensors(checkpoint)
    experts = 0
    for name, value in moe.items():
        if ".mlp.router." in name:
            continue
        if ".mlp.experts.experts." in name:  # [E, ...] stacked: every expert is the dense FFN
            dense_ffn = dense_tensor(src, name.replace(".mlp.experts.experts.", ".mlp."))
            for e in range(4):
                assert torch.equal(value[e], dense_ffn), (name, e)
                experts += 1
        else:
            assert torch.equal(value, dense_tensor(src, name)), name
    assert experts == 4 * 2 * 4  # layers x (fc1, fc2) x experts
    router = torch.cat([moe[f"decoder.layers.{i}.mlp.router.weight"].reshape(-1) for i in range(4)])
    assert abs(router.std().item() - 0.02) < 0.004  # fresh routers: N(0, init_method_std)

    # An ordinary checkpoint: an EP2 run starts from it, and its first loss (the weights before
    # any update) is the dense model's on the same batch.
    run = first_loss_under_ep2(train_run, out)
    assert rel_diff(run.losses[1], dense_loss) < 1e-5, (run.losses[1], dense_loss)

    # Bad input is refused before any work, and OUT is not created.
    for args, message in [
        ((str(out / STEP0), str(tmp_path / "bad1"), "--experts", "4"), "holds an MoE model"),
        (
            (str(checkpoint), str(tmp_path / "bad2"), "--experts", "1", "--top-k", "2"),
            "need 1 <= top-k <= experts",
        ),
        (
            (str(checkpoint), str(tmp_path / "bad3"), "--experts", "4", "model.hidden_size=32"),
            "change the dense model's structure",
        ),
        (
            (str(checkpoint), str(tmp_path / "bad4"), "--experts", "3", "parallel.expert=2"),
            "parallel.expert",
        ),
    ]:
        refused = moectl("upcycle", *args, timeout=300)
        assert refused.returncode == 2 and message in refused.stderr, refused.stderr
        assert not Path(args[1]).exists()


def test_pesc_upcycling_keeps_the_output_and_trains_only_adapters_and_routers(
    dense, train_run, tmp_path
):
    checkpoint, dense_loss = dense
    out = tmp_path / "pesc"
    done = moectl(
        "upcycle", str(checkpoint), str(out), "--experts", "4", "--pesc", "model.moe.adapter_dim=16"
    )
    assert done.returncode == 0, done.stdout + done.stderr
    cfg = load_config(out / "config.yaml")
    assert cfg.model.moe.expert_kind == "adapter" and cfg.train.trainable == "adapters_and_routers"
    assert cfg.model.moe.moe_scaling == 0.25 and cfg.model.moe.adapter_dropout == 0.1
    report = json.loads((out / "upcycle_report.json").read_text())
    assert report["logits_max_abs_diff"] <= 1e-5 * report["logits_max_abs"], report
    start, src = model_tensors(out / STEP0), model_tensors(checkpoint)
    for i in range(4):
        layer = f"decoder.layers.{i}.mlp"
        for fc in ("linear_fc1", "linear_fc2"):  # the dense FFN is the shared FFN
            assert torch.equal(
                start[f"{layer}.shared_ffn.{fc}.weight"], dense_tensor(src, f"{layer}.{fc}.weight")
            )
        assert not start[f"{layer}.experts.experts.linear_fc2.weight"].any()  # W_up = 0
        assert start[f"{layer}.experts.experts.linear_fc1.weight"].std() > 0.01  # W_down: fresh

    # 3 steps under EP2 (adapter dropout on): the first loss is the dense model's; only the
    # adapters and routers change, every other tensor is bit-identical; the optimizer holds
    # state for those alone.
    run = train_run(
        ["parallel.expert=2", "train.steps=3", "train.warmup_steps=1", "checkpoint.interval=null"],
        config=out / "config.yaml",
    )
    assert run.code == 0, run.log()
    assert rel_diff(run.losses[1], dense_loss) < 1e-5, (run.losses[1], dense_loss)
    trained = read_tensors(run.run_dir / "checkpoints" / "step_00000003")
    after = {k: v for k, v in trained.items() if k in start}
    assert set(after) == set(start)
    changed = {k for k in start if not torch.equal(start[k], after[k])}
    learnable = {k for k in start if ".mlp.router." in k or ".mlp.experts." in k}
    assert changed == learnable, sorted(changed ^ learnable)
    assert len(learnable) == 4 * 3 and len(start) - len(learnable) > 20
    optimizer = {k.split(".", 2)[2] for k in trained if k.startswith("optimizer.param.")}
    assert optimizer == learnable


def test_camelidae_twin_equations_same_losses_ep1_ep2_and_counts(train_run, tmp_path):
    # One adapter MoE layer against PESC's equations written out with plain torch.
    check_dir = tmp_path / "check"
    check_dir.mkdir()
    (check_dir / "config.yaml").write_text(TWIN.read_text())
    code = run_local(
        RunSpec(
            check_dir,
            1,
            [
                sys.executable,
                str(REPO / "tests" / "integration" / "pesc_layer_check.py"),
                str(check_dir),
            ],
        ),
        stream=False,
    )
    assert code == 0, (check_dir / "logs" / "rank0.log").read_text()[-3000:]
    check = json.loads((check_dir / "check.json").read_text())
    # The adapters carry weight (their term is as large as the shared FFN's, their activation
    # sees unit-scale inputs), so the equations match the layer and a GELU/SiLU swap does not.
    assert check["adapter_to_h_min"] > 0.3 and check["activation_input_std_min"] > 0.5, check
    for pre_softmax in (False, True):
        assert check[f"max_rel_diff_pre_softmax_{pre_softmax}"] < 1e-5, check
        assert check[f"silu_rel_diff_pre_softmax_{pre_softmax}"] > 1e-2, check

    five = ["train.steps=5", "train.warmup_steps=1", "checkpoint.interval=null"]
    ep2 = train_run(five, config=TWIN)
    assert ep2.code == 0, ep2.log()
    ep1 = train_run([*five, "parallel.expert=1", "parallel.data=1"], config=TWIN)
    assert ep1.code == 0, ep1.log()
    for step in range(1, 6):
        assert rel_diff(ep1.losses[step], ep2.losses[step]) < 1e-4, (step, ep1.losses, ep2.losses)
    assert ep1.losses[5] < ep1.losses[1]
    tensors = model_tensors(ep2.run_dir / "checkpoints" / "step_00000005")
    vocab = tensors["embedding.word_embeddings.weight"].shape[0]
    cfg = load_config(ep2.run_dir / "config.yaml")
    assert sum(t.numel() for t in tensors.values()) == count_parameters(cfg.model, vocab).total
    assert tuple(tensors["decoder.layers.0.mlp.experts.experts.linear_fc1.weight"].shape) == (
        8,
        16,
        64,
    )
    assert tuple(tensors["decoder.layers.0.mlp.shared_ffn.linear_fc1.weight"].shape) == (256, 64)
