"""BTX mix end to end on real checkpoints: two dense branches trained on 2 ranks, mixed on one
rank into a 2-expert MoE, checked tensor by tensor and layer by layer, then finetuned under EP2."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from cluster import RunSpec, new_run_dir, run_local
from moe_parallel.config import dump_config, load_config
from tests.conftest import REPO, TEST_DATA, TINY

pytestmark = pytest.mark.integration

DENSE = REPO / "configs" / "tiny" / "dense_tiny.yaml"
SHORT = ["train.steps=3", "train.warmup_steps=1", "checkpoint.interval=null"]
MOE = ["model.moe.num_experts=2", "model.moe.top_k=1", "model.moe.pre_softmax=true"]


def _one_rank(run_dir: Path, entry: list[str]) -> None:
    code = run_local(RunSpec(run_dir=run_dir, world_size=1, entry=entry), stream=False)
    assert code == 0, (run_dir / "logs" / "rank0.log").read_text()[-3000:]


def test_mixed_moe_has_the_branches_as_experts_and_their_mean_elsewhere(train_run, tmp_path, data_cache):
    data = [*TEST_DATA, f"data.cache_dir={data_cache}", "log.tensorboard=false"]
    branches = []
    for seed in (1, 2):
        run = train_run([*SHORT, f"train.seed={seed}"], config=DENSE)
        assert run.code == 0, run.log()
        branches.append(run.run_dir / "checkpoints" / "step_00000003")
    moe_cfg = load_config(TINY, [*data, *MOE])
    dense_cfg = load_config(DENSE, data)
    mix_dir = new_run_dir(tmp_path / "mix", "btx-mix")
    (mix_dir / "moe.yaml").write_text(dump_config(moe_cfg))
    (mix_dir / "dense.yaml").write_text(dump_config(dense_cfg))
    (mix_dir / "mix.json").write_text(json.dumps({
        "dense_config": str(mix_dir / "dense.yaml"), "moe_config": str(mix_dir / "moe.yaml"),
        "experts": [str(b) for b in branches], "out": str(mix_dir / "checkpoints")}))
    _one_rank(mix_dir, [sys.executable, "-m", "moe_parallel.btx.mix_entry", str(mix_dir)])
    report = json.loads((mix_dir / "mix_report.json").read_text())
    assert report["routers_kept"] == [f"decoder.layers.{i}.mlp.router.weight" for i in range(4)]

    _one_rank(mix_dir, [sys.executable, str(REPO / "tests" / "integration" / "btx_check.py"), str(mix_dir)])
    check = json.loads((mix_dir / "check.json").read_text())
    assert check["experts_checked"] == 4 * 2 * 2  # layers x experts x (fc1, fc2)
    assert check["expert_max_diff"] == 0.0  # expert i of every layer IS branch i's FFN
    assert check["means_checked"] > 10 and check["mean_max_diff"] <= 1e-7
    assert check["forced_cases"] == 4 * 2
    # Router forced to expert i: the MoE layer's output is branch i's FFN output.
    assert check["forced_router_max_rel_diff"] <= 1e-5, check

    # The mixed checkpoint is an ordinary one: an EP2 finetune starts from it.
    tune = train_run([*MOE, "train.steps=2", "train.warmup_steps=1",
                      f"checkpoint.init_from={mix_dir / 'checkpoints' / 'step_00000000'}"])
    assert tune.code == 0, tune.log()
    assert tune.event("resume")["step"] == 0 and sorted(tune.losses) == [1, 2]
