"""A process killed in each window of rank 0's publish (``checkpoint.publish``), one rank, no
process group: what is on disk afterwards, what ``latest_checkpoint`` reads, and that the next
save mends it. Each save runs in a forked child (a SIGKILL ends it as a crash would); its shards
are a small torch.distributed.checkpoint save, since the publish only reads their metadata.
The same windows in real multi-rank runs, with the losses after resuming:
tests/integration/test_manifest.py."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal
import traceback

import pytest
import torch
import torch.distributed.checkpoint as dcp
from megatron.core import parallel_state

from moe_parallel.ckpt.checkpoint import (
    LATEST,
    META,
    PARTIAL,
    Progress,
    finished_checkpoints,
    latest_checkpoint,
    prepare_partial,
    publish,
    resolve_checkpoint,
    step_name,
)
from moe_parallel.ckpt.manifest import MANIFEST, verify
from moe_parallel.config import load_config
from moe_parallel.runtime.faults import FAULT_ENV, parse_fault
from tests.conftest import TINY

KILLED = -signal.SIGKILL


def _save(root, step: int, generation: int) -> None:
    """One save as save_checkpoint makes it, minus the ranks; ``generation`` goes into
    meta.json's consumed_samples, to tell two saves of a step apart. In the forked child only
    (it sets Megatron's pipeline size, which meta.json records)."""
    parallel_state.set_pipeline_model_parallel_world_size(1)
    final = root / step_name(step)
    partial = final.with_name(final.name + PARTIAL)
    prepare_partial(root, partial)
    dcp.save({"w": torch.full((64,), float(step))}, checkpoint_id=str(partial))
    cfg = load_config(TINY)
    progress = Progress(step=step, consumed_samples=generation)
    publish(root, partial, final, progress, cfg, keep=set())


def _child(root, saves, fault) -> None:
    try:
        for i, (step, generation) in enumerate(saves):
            if i == len(saves) - 1 and fault:
                os.environ[FAULT_ENV] = fault  # only the last save is the faulted one
            _save(root, step, generation)
    except BaseException:
        traceback.print_exc()
        os._exit(1)
    os._exit(0)


def _run(root, saves, fault=None) -> int:
    """Exit code of a forked process making ``saves`` [(step, generation)], ``fault`` on the
    last one."""
    proc = multiprocessing.get_context("fork").Process(target=_child, args=(root, saves, fault))
    proc.start()
    proc.join(120)
    assert proc.exitcode is not None, "the save process did not end within 120 s"
    return proc.exitcode


def _generation(path) -> int:
    return json.loads((path / META).read_text())["consumed_samples"]


def _names(root) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def test_killed_before_the_manifest_leaves_only_a_partial(tmp_path, caplog):
    root = tmp_path / "ckpts"
    assert _run(root, [(3, 0), (6, 0)], "kill_before_manifest:rank=0:step=6") == KILLED
    partial = root / (step_name(6) + ".partial")
    assert _names(root) == [LATEST, step_name(3), partial.name]
    assert {".metadata", "__0_0.distcp", META} <= set(os.listdir(partial))
    assert not (partial / MANIFEST).exists()
    assert (root / LATEST).read_text() == step_name(3)
    with caplog.at_level(logging.WARNING):
        assert latest_checkpoint(root) == root / step_name(3)
    assert not caplog.records  # latest names a finished checkpoint: nothing to fall back from
    assert finished_checkpoints(root) == [root / step_name(3)]
    # The half save does not read as a checkpoint, by any of the names a user could give.
    with pytest.raises(FileNotFoundError, match="has no manifest.json"):
        resolve_checkpoint(partial)
    with pytest.raises(
        FileNotFoundError, match=r"no finished checkpoint for step 6 .*step_00000003"
    ):
        resolve_checkpoint(root, step=6)

    assert _run(root, [(6, 1)]) == 0  # the next save clears the partial
    assert _names(root) == [LATEST, step_name(3), step_name(6)]
    assert latest_checkpoint(root) == root / step_name(6)
    assert verify(root / step_name(6)) == []


def test_killed_before_latest_moves_leaves_latest_on_the_older(tmp_path):
    root = tmp_path / "ckpts"
    assert _run(root, [(3, 0), (6, 0)], "kill_before_latest:rank=0:step=6") == KILLED
    assert _names(root) == [LATEST, step_name(3), step_name(6)]
    assert verify(root / step_name(6)) == []  # finished, only not published by latest
    assert latest_checkpoint(root) == root / step_name(3)

    # Resuming from step 3 re-saves step 6: the swap of the old and the new directory.
    assert _run(root, [(6, 1)]) == 0
    assert _names(root) == [LATEST, step_name(3), step_name(6)]
    assert latest_checkpoint(root) == root / step_name(6)
    assert _generation(root / step_name(6)) == 1
    assert verify(root / step_name(6)) == []


def test_killed_between_the_renames_of_a_resave(tmp_path, caplog):
    """latest names step 6, whose re-save moved the old directory away and died before moving
    the new one in: latest_checkpoint falls back to step 3 (saying so), the next save puts the
    old step 6 back before it saves."""
    root = tmp_path / "ckpts"
    saves = [(3, 0), (6, 0), (6, 1)]
    assert _run(root, saves, "kill_between_renames:rank=0:step=6") == KILLED
    old, new = root / (step_name(6) + ".replaced"), root / (step_name(6) + ".partial")
    assert _names(root) == [LATEST, step_name(3), new.name, old.name]
    assert (root / LATEST).read_text() == step_name(6)  # naming a missing directory
    assert verify(old) == [] and _generation(old) == 0
    assert verify(new) == [] and _generation(new) == 1  # finished, never renamed in
    assert finished_checkpoints(root) == [root / step_name(3)]

    with caplog.at_level(logging.WARNING, logger="moe_parallel.ckpt.checkpoint"):
        assert latest_checkpoint(root) == root / step_name(3)
        assert resolve_checkpoint(root) == root / step_name(3)
    assert [r.getMessage() for r in caplog.records] == [
        f"checkpoint fallback: {root / LATEST} names {step_name(6)}, which is missing; "
        f"using {step_name(3)}, the newest verified checkpoint"
    ] * 2

    assert _run(root, [(6, 2)]) == 0  # the next save: old put back, then swapped for the new
    assert _names(root) == [LATEST, step_name(3), step_name(6)]
    assert latest_checkpoint(root) == root / step_name(6)
    assert _generation(root / step_name(6)) == 2
    assert verify(root / step_name(6)) == []


def test_killed_between_the_renames_then_a_save_of_another_step(tmp_path):
    root = tmp_path / "ckpts"
    assert _run(root, [(3, 0), (6, 0), (6, 1)], "kill_between_renames:rank=0:step=6") == KILLED
    assert _run(root, [(9, 0)]) == 0
    assert _names(root) == [LATEST, step_name(3), step_name(6), step_name(9)]
    assert _generation(root / step_name(6)) == 0  # the old step 6, put back as it was
    assert verify(root / step_name(6)) == []
    assert latest_checkpoint(root) == root / step_name(9)


def test_publish_faults_name_rank_0():
    assert parse_fault("kill_between_renames:rank=0:step=6") == (
        "kill_between_renames",
        {"rank": 0, "step": 6},
    )
    with pytest.raises(ValueError, match="fires in rank 0's publish; use rank=0"):
        parse_fault("kill_before_latest:rank=1:step=6")
