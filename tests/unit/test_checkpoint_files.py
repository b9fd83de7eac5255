"""Checkpoint directory rules that need no ranks: latest, partial saves, retention."""

from __future__ import annotations

import json
import logging
import shutil

import pytest

from moe_parallel.ckpt.checkpoint import (
    CheckpointMismatch,
    finished_checkpoints,
    latest_checkpoint,
    prune,
    recover_interrupted_swap,
    step_name,
)


def _finished(root, step):
    path = root / step_name(step)
    path.mkdir(parents=True)
    (path / "meta.json").write_text(json.dumps({"step": step}))
    _manifest_of_files(path)
    return path


def test_partial_replaced_and_metaless_dirs_are_not_checkpoints(tmp_path):
    a = _finished(tmp_path, 5)
    (tmp_path / (step_name(10) + ".partial")).mkdir()
    (tmp_path / step_name(15)).mkdir()  # no manifest.json: not a finished save
    old = _finished(tmp_path, 20)
    old.rename(old.with_name(old.name + ".replaced"))  # the old half of an interrupted re-save
    assert finished_checkpoints(tmp_path) == [a]
    assert prune(tmp_path, keep_last=1, keep=set()) == []


def test_latest_names_a_finished_checkpoint_or_falls_back_saying_so(tmp_path, caplog):
    assert latest_checkpoint(tmp_path) is None
    a = _finished(tmp_path, 5)
    (tmp_path / "latest").write_text(a.name)
    assert latest_checkpoint(tmp_path) == a
    (tmp_path / step_name(9)).mkdir()
    (tmp_path / "latest").write_text(step_name(9))
    with caplog.at_level(logging.WARNING, logger="moe_parallel.ckpt.checkpoint"):
        assert latest_checkpoint(tmp_path) == a
    assert caplog.records[-1].getMessage() == (
        f"checkpoint fallback: {tmp_path / 'latest'} names {step_name(9)}, which has no "
        f"manifest.json; using {a.name}, the newest verified checkpoint"
    )


def test_the_fallback_skips_a_checkpoint_that_fails_verification(tmp_path, caplog):
    good = _finished(tmp_path, 5)
    bad = _finished(tmp_path, 8)
    (bad / "extra.bin").write_text("changed after the manifest")
    _manifest_of_files(bad, {"extra.bin": "0" * 64})
    (tmp_path / "latest").write_text(step_name(9))  # missing
    with caplog.at_level(logging.WARNING, logger="moe_parallel.ckpt.checkpoint"):
        assert latest_checkpoint(tmp_path) == good
    message = caplog.records[-1].getMessage()
    assert f"names {step_name(9)}, which is missing" in message
    assert f"{bad.name} fails verification (extra.bin: contents do not match" in message
    shutil.rmtree(good)
    with pytest.raises(CheckpointMismatch, match=f"no verified checkpoint under {tmp_path}"):
        latest_checkpoint(tmp_path)


def test_an_interrupted_swap_is_undone(tmp_path, caplog):
    """recover_interrupted_swap (run by every save before it starts): the old directory goes
    back when the new one never arrived, and is deleted when it did."""
    back = _finished(tmp_path, 6)
    (back / "old.txt").write_text("old")
    back.rename(tmp_path / (step_name(6) + ".replaced"))
    done = _finished(tmp_path, 9)
    _finished(tmp_path, 90).rename(tmp_path / (step_name(9) + ".replaced"))
    with caplog.at_level(logging.WARNING, logger="moe_parallel.ckpt.checkpoint"):
        recover_interrupted_swap(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [step_name(6), step_name(9)]
    assert (back / "old.txt").read_text() == "old"
    assert json.loads((done / "meta.json").read_text())["step"] == 9  # the new one stays
    assert len(caplog.records) == 2

    unfinished = tmp_path / step_name(12)
    unfinished.mkdir()
    _finished(tmp_path, 120).rename(tmp_path / (step_name(12) + ".replaced"))
    with pytest.raises(ValueError, match="step_00000012 has no manifest.json and"):
        recover_interrupted_swap(tmp_path)


def _manifest_of_files(path, files=None):
    """A manifest with no tensors: verification checks only ``files`` (name -> sha256)."""
    manifest = {"chunk_file_sizes": {}, "chunks": [], "files": files or {}}
    (path / "manifest.json").write_text(json.dumps(manifest))


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


def _gpu_rng(tagged: bool) -> dict:
    """What a GPU rank saves: its CPU generator, a CUDA Philox state (16 bytes), Megatron's
    tracker states (CUDA states too)."""
    import torch

    philox = torch.zeros(16, dtype=torch.uint8)
    rng = {"cpu": torch.get_rng_state(), "cuda": philox, "tracker": {"model-parallel-rng": philox}}
    return {**rng, "device": "cuda"} if tagged else rng  # untagged: saved before the tag existed


@pytest.mark.parametrize("tagged", [True, False])
def test_a_gpu_checkpoints_rng_resumes_on_cpu_ranks_with_the_cpu_generator_only(tagged, caplog):
    import torch
    from megatron.core import tensor_parallel

    from moe_parallel.ckpt.checkpoint import rng_device, set_rng_states

    assert rng_device() == "cpu"
    rng = _gpu_rng(tagged)
    torch.manual_seed(1)
    expected = torch.rand(4)
    torch.manual_seed(1)
    rng["cpu"] = torch.get_rng_state()
    torch.manual_seed(2)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    before = tracker.get_states()
    with caplog.at_level(logging.WARNING):
        set_rng_states(rng)  # a 16-byte Philox state is no CPU generator state: must not load
    assert torch.equal(torch.rand(4), expected)  # the CPU generator carried over
    assert tracker.get_states().keys() == before.keys()
    assert "saved on cuda ranks" in caplog.text


def test_a_cpu_checkpoints_rng_restores_the_tracker_on_cpu_ranks():
    import torch
    from megatron.core import tensor_parallel

    from moe_parallel.ckpt.checkpoint import set_rng_states

    state = torch.get_rng_state()
    set_rng_states({"cpu": state, "tracker": {"model-parallel-rng": state}, "device": "cpu"})
    assert torch.equal(
        tensor_parallel.get_cuda_rng_tracker().get_states()["model-parallel-rng"], state
    )
