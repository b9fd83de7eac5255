"""`moectl finetune`'s config through `moectl submit` on the real local SLURM cluster: the same
training entry, so the SLURM run's losses equal the local run's (EP2, expert dropout on: its
masks are keyed by token, not by a rank's RNG)."""

from __future__ import annotations

import pytest

from tests.conftest import rel_diff
from tests.integration.cluster_helpers import losses, state
from tests.integration.test_flan_finetune import FLAN, _ckpt, base  # noqa: F401  (fixture)
from tests.integration.test_slurm import submit  # noqa: F401  (fixture)

pytestmark = pytest.mark.integration


def test_finetune_on_slurm_equals_the_local_finetune(submit, base, train_run):  # noqa: F811
    overrides = [
        f"checkpoint.init_from={_ckpt(base, 10)}",
        "train.steps=4",
        "train.warmup_steps=1",
        "checkpoint.interval=null",
    ]
    done, run_dir = submit(overrides, "--wait", config=FLAN)
    assert done.returncode == 0, done.stdout + done.stderr
    assert state(run_dir)["status"] == "completed"
    local = train_run(overrides, config=FLAN)
    assert local.code == 0, local.log()
    on_slurm = losses(run_dir)
    assert sorted(on_slurm) == [1, 2, 3, 4]
    for step in range(1, 5):
        assert rel_diff(on_slurm[step], local.losses[step]) < 1e-6, (step, on_slurm, local.losses)
