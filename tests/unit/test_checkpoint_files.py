"""Checkpoint directory rules that need no ranks: latest, partial saves, retention."""

from __future__ import annotations

import json

import pytest

from moe_parallel.ckpt.checkpoint import (
    CheckpointMismatch,
    finished_checkpoints,
    latest_checkpoint,
    prune,
    step_name,
)


def _finished(root, step):
    path = root / step_name(step)
    path.mkdir(parents=True)
    (path / "meta.json").write_text(json.dumps({"step": step}))
    (path / "manifest.json").write_text(json.dumps({"step": step}))
    return path


def test_partial_and_metaless_dirs_are_not_checkpoints(tmp_path):
    a = _finished(tmp_path, 5)
    (tmp_path / (step_name(10) + ".partial")).mkdir()
    (tmp_path / step_name(15)).mkdir()  # no manifest.json: not a finished save
    assert finished_checkpoints(tmp_path) == [a]


def test_latest_must_name_a_finished_checkpoint(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    a = _finished(tmp_path, 5)
    (tmp_path / "latest").write_text(a.name)
    assert latest_checkpoint(tmp_path) == a
    (tmp_path / step_name(9)).mkdir()
    (tmp_path / "latest").write_text(step_name(9))
    with pytest.raises(CheckpointMismatch, match="no manifest.json"):
        latest_checkpoint(tmp_path)


def test_prune_keeps_the_newest_and_the_protected(tmp_path):
    paths = [_finished(tmp_path, s) for s in (10, 20, 30, 40, 50)]
    removed = prune(tmp_path, keep_last=2, keep={paths[0]})
    assert removed == paths[1:3]
    assert finished_checkpoints(tmp_path) == [paths[0], paths[3], paths[4]]


def test_prune_keeps_every_mth_step(tmp_path):
    for step in (10, 20, 30, 40, 50, 60):
        _finished(tmp_path, step)
    prune(tmp_path, keep_last=1, keep=set(), keep_every=20)
    assert [p.name for p in finished_checkpoints(tmp_path)] == [
        step_name(20),
        step_name(40),
        step_name(60),
    ]


def test_a_checkpoint_of_another_family_is_refused_naming_the_fields():
    from pathlib import Path

    from moe_parallel.ckpt.checkpoint import check_compatible
    from moe_parallel.config import load_config
    from tests.conftest import REPO

    grin = load_config(REPO / "configs" / "tiny" / "grin_moe_tiny.yaml")
    meta = {"model": grin.model.model_dump(mode="json")}
    check_compatible(meta, grin, Path("ckpt"))  # its own config loads it
    plain = load_config(
        REPO / "configs" / "tiny" / "grin_moe_tiny.yaml",
        ["model.moe.router=topk", "model.output_layer_bias=false"],
    )
    with pytest.raises(CheckpointMismatch) as err:
        check_compatible(meta, plain, Path("ckpt"))
    assert "model.moe.router: checkpoint 'sparsemixer', config 'topk'" in str(err.value)
    assert "model.output_layer_bias: checkpoint True, config False" in str(err.value)
    # A checkpoint written before these fields existed has their defaults.
    plain = load_config(REPO / "configs" / "tiny" / "moe_tiny.yaml")
    old = {"model": plain.model.model_dump(mode="json")}
    for key in ("attention", "attention_output_bias", "output_layer_bias"):
        del old["model"][key]
    del old["model"]["moe"]["shared_expert_gate"], old["model"]["moe"]["router"]
    check_compatible(old, plain, Path("ckpt"))
