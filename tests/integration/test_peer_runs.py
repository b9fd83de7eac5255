"""PEER's tiny twin (configs/tiny/peer_tiny.yaml): the same losses with the expert tables on one
rank (EP1) and sharded over two (EP2), parameter counts equal to the checkpoint's tensors, the
tables saved with their global shape, and an EP2 checkpoint resumed under EP1."""

from __future__ import annotations

import json

import pytest

from tests.conftest import REPO
from tests.integration.test_model_families import ONE_RANK, _counts_match, _same_losses

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

PEER = REPO / "configs" / "tiny" / "peer_tiny.yaml"
SEVEN = ["train.steps=7", "train.warmup_steps=1", "checkpoint.interval=5"]


def test_peer_twin_same_losses_ep1_ep2_counts_and_sharded_tables(train_run):
    ep2 = train_run(SEVEN, config=PEER)
    assert ep2.code == 0, ep2.log()
    ep1 = train_run([*SEVEN, *ONE_RANK], config=PEER)
    assert ep1.code == 0, ep1.log()
    _same_losses(ep1, ep2, steps=7)
    tensors = _counts_match(ep2)
    # The tables are saved whole ([N, d]) although each EP2 rank holds N/2 rows.
    for name in ("expert_down", "expert_up"):
        assert tuple(tensors[f"decoder.layers.2.mlp.{name}.weight"].shape) == (1024, 64)
    # ... written by the two ranks as two chunks of 512 rows (manifest.json of the checkpoint).
    manifest = json.loads(
        (ep2.run_dir / "checkpoints" / "step_00000005" / "manifest.json").read_text()
    )
    offsets = sorted(
        c["offset"][0]
        for c in manifest["chunks"]
        if c["tensor"] == "decoder.layers.2.mlp.expert_down.weight"
    )
    assert offsets == [0, 512]
    assert tuple(tensors["decoder.layers.2.mlp.product_keys.weight"].shape) == (2, 32, 16)
    assert tuple(tensors["decoder.layers.2.mlp.query.weight"].shape) == (4 * 32, 64)
    assert "decoder.layers.1.mlp.linear_fc1.weight" in tensors  # the other layers stay dense
    assert not any(k.startswith("decoder.layers.2.mlp.linear_fc") for k in tensors)
    # EP2's step-5 checkpoint resumed under EP1 (tables resharded) continues like EP1's run.
    resumed = train_run(
        [*SEVEN, *ONE_RANK, f"checkpoint.resume={ep2.run_dir / 'checkpoints' / 'step_00000005'}"],
        config=PEER,
    )
    assert resumed.code == 0, resumed.log()
    assert sorted(resumed.losses) == [6, 7]
    for step in (6, 7):
        assert abs(resumed.losses[step] / ep1.losses[step] - 1) < 1e-4, (step, resumed.losses)
