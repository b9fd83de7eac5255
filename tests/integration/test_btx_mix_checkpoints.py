"""BTX mix end to end on real checkpoints: two dense branches trained on 2 ranks, mixed on one
rank into a 2-expert MoE, checked tensor by tensor and layer by layer, then finetuned under EP2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cluster import RunSpec, run_local
from moe_parallel.config import dump_config, load_config
from tests.conftest import REPO, TEST_DATA, TINY

pytestmark = pytest.mark.integration

DENSE = REPO / "configs" / "tiny" / "dense_tiny.yaml"
SHORT = ["train.steps=3", "train.warmup_steps=1", "checkpoint.interval=null"]
MOE = ["model.moe.num_experts=2", "model.moe.top_k=1", "model.moe.pre_softmax=true"]


def _one_rank(run_dir: Path, entry: list[str]) -> None:
    code = run_local(RunSpec(run_dir=run_dir, world_size=1, entry=entry), stream=False)
    assert code == 0, (run_dir / "logs" / "rank0.log").read_text()[-3000:]


def test_mixed_moe_has_the_branches_as_experts_and_their_mean_elsewhere(
    train_run, tmp_path, data_cache
):
    data = [*TEST_DATA, f"data.cache_dir={data_cache}", "log.tensorboard=false"]
    branches = []
    for seed in (1, 2):
        run = train_run([*SHORT, f"train.seed={seed}"], config=DENSE)
        assert run.code == 0, run.log()
        branches.append(run.run_dir / "checkpoints" / "step_00000003")
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "moe.yaml").write_text(dump_config(load_config(TINY, [*data, *MOE])))
    (configs / "dense.yaml").write_text(dump_config(load_config(DENSE, data)))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "launch.cli",
            "btx",
            "mix",
            *map(str, branches),
            "--dense",
            str(configs / "dense.yaml"),
            "--moe",
            str(configs / "moe.yaml"),
            "--runs",
            str(tmp_path / "mix"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    refused = subprocess.run(
        [
            sys.executable,
            "-m",
            "launch.cli",
            "btx",
            "mix",
            str(branches[0]),
            "--dense",
            str(configs / "dense.yaml"),
            "--moe",
            str(configs / "moe.yaml"),
            "--runs",
            str(tmp_path / "refused"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode == 2 and "1 branch checkpoints given" in refused.stderr
    assert not (tmp_path / "refused").exists()
    mix_dir = Path(done.stdout.split("run directory: ", 1)[1].splitlines()[0])
    report = json.loads((mix_dir / "mix_report.json").read_text())
    assert report["routers_kept"] == [f"decoder.layers.{i}.mlp.router.weight" for i in range(4)]

    _one_rank(
        mix_dir,
        [sys.executable, str(REPO / "tests" / "integration" / "btx_check.py"), str(mix_dir)],
    )
    check = json.loads((mix_dir / "check.json").read_text())
    assert check["experts_checked"] == 4 * 2 * 2  # layers x experts x (fc1, fc2)
    assert check["expert_max_diff"] == 0.0  # expert i of every layer IS branch i's FFN
    assert check["means_checked"] > 10 and check["mean_max_diff"] <= 1e-7
    assert check["forced_cases"] == 4 * 2
    # Router forced to expert i: the MoE layer's output is branch i's FFN output.
    assert check["forced_router_max_rel_diff"] <= 1e-5, check

    assert abs(check["router_std"] - 0.02) < 0.004  # fresh routers: N(0, init_method_std)

    # Options: non-expert parameters from one model (here branch 1) and wider routers.
    other = subprocess.run(
        [
            sys.executable,
            "-m",
            "launch.cli",
            "btx",
            "mix",
            *map(str, branches),
            "--dense",
            str(configs / "dense.yaml"),
            "--moe",
            str(configs / "moe.yaml"),
            "--non-expert-from",
            str(branches[1]),
            "--router-init-std",
            "0.5",
            "--runs",
            str(tmp_path / "mix2"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert other.returncode == 0, other.stdout + other.stderr
    mix2 = Path(other.stdout.split("run directory: ", 1)[1].splitlines()[0])
    _one_rank(
        mix2, [sys.executable, str(REPO / "tests" / "integration" / "btx_check.py"), str(mix2)]
    )
    check2 = json.loads((mix2 / "check.json").read_text())
    assert check2["expert_max_diff"] == 0.0 and check2["mean_max_diff"] == 0.0  # = branch 1's
    assert abs(check2["router_std"] - 0.5) < 0.1

    # The mixed checkpoint is an ordinary one: an EP2 finetune starts from it.
    tune = train_run(
        [
            *MOE,
            "train.steps=2",
            "train.warmup_steps=1",
            f"checkpoint.init_from={mix_dir / 'checkpoints' / 'step_00000000'}",
        ]
    )
    assert tune.code == 0, tune.log()
    assert tune.event("init")["step"] == 0 and sorted(tune.losses) == [1, 2]
