"""Checkpoints that cannot be silently wrong: manifests, verification, interrupted saves."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest

from moe_parallel.ckpt.checkpoint import latest_checkpoint
from moe_parallel.ckpt.manifest import read_manifest, verify
from tests.conftest import REPO, require

pytestmark = pytest.mark.integration

FAULT = "MOE_PARALLEL_FAULT"
SIX = ["train.steps=6", "train.warmup_steps=2", "checkpoint.interval=3", "train.precision=fp32"]


def _moectl(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "launch.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_flipped_byte_is_found_and_named(train_run):
    run = train_run(SIX)
    assert run.code == 0, run.log()
    ckpt = run.run_dir / "checkpoints" / "step_00000003"
    assert verify(ckpt) == []
    ok = _moectl("ckpt", "verify", str(run.run_dir), "3")
    assert ok.returncode == 0 and "OK" in ok.stdout, ok.stdout + ok.stderr
    shown = _moectl("ckpt", "inspect", str(run.run_dir))
    assert "step 6" in shown.stdout and "embedding.word_embeddings.weight" in shown.stdout

    # Flip one byte inside the stored bytes of an expert weight.
    chunk = next(
        c
        for c in read_manifest(ckpt)["chunks"]
        if ".mlp.experts." in c["tensor"] and c["tensor"].endswith(".weight") and c["length"] > 100
    )
    shard = ckpt / chunk["file"]
    data = bytearray(shard.read_bytes())
    data[chunk["start"] + 50] ^= 0xFF
    shard.write_bytes(bytes(data))

    problems = verify(ckpt)
    assert [p.what for p in problems] == [
        f"tensor {chunk['tensor']}" + (f" (chunk at {chunk['offset']})" if chunk["offset"] else "")
    ]
    bad = _moectl("ckpt", "verify", str(run.run_dir), "3")
    assert bad.returncode == 1 and chunk["tensor"] in bad.stdout

    resumed = train_run([*SIX, f"checkpoint.resume={ckpt}"])
    assert resumed.code != 0
    assert "failed verification" in resumed.log() and chunk["tensor"] in resumed.log()


def test_a_kill_in_any_window_of_a_save_keeps_latest_good(train_run):
    """The step-6 save of one run killed in one window after another (each resume retrains
    steps 4-6 from step 3 and saves again): before any write, after rank 0's shards, after the
    rename before ``latest``; then a resume that re-saves step 6 over the finished one."""
    run = train_run(SIX, env={FAULT: "kill_before_writes:rank=0:step=6"})
    assert run.code != 0
    first = dict(run.losses)
    assert sorted(first) == [1, 2, 3, 4, 5, 6]
    root = run.run_dir / "checkpoints"
    partial = root / "step_00000006.partial"
    assert _names(root) == ["latest", "step_00000003", partial.name]
    assert not list(partial.iterdir())  # made by rank 0, nothing written into it
    assert latest_checkpoint(root) == root / "step_00000003"

    run = _resumed_from_step_3(train_run, run, first, "kill_in_save:rank=0:step=6")
    assert _names(root) == ["latest", "step_00000003", partial.name]
    assert list(partial.glob("*.distcp"))  # rank 0's shards, and nothing of the publish
    assert not (partial / "meta.json").exists() and not (partial / "manifest.json").exists()
    assert latest_checkpoint(root) == root / "step_00000003"

    run = _resumed_from_step_3(train_run, run, first, "kill_before_latest:rank=0:step=6")
    assert _names(root) == ["latest", "step_00000003", "step_00000006"]
    assert verify(root / "step_00000006") == []  # finished, but latest was not moved to it
    assert latest_checkpoint(root) == root / "step_00000003"
    unpublished = _saved_at(root / "step_00000006")

    run = _resumed_from_step_3(train_run, run, first, None)  # re-saves step 6: the swap
    assert run.code == 0, run.log()
    assert _names(root) == ["latest", "step_00000003", "step_00000006"]
    assert latest_checkpoint(root) == root / "step_00000006"
    assert verify(root / "step_00000006") == []
    assert _saved_at(root / "step_00000006") > unpublished


def test_a_resave_killed_between_its_renames_falls_back_then_is_mended(train_run, tmp_path, caplog):
    """A run resumed from step 3 of a finished run re-saves step 6 and dies between renaming the
    old step 6 away and the new one in: ``latest`` names a missing directory. Readers fall back
    to step 3, saying so; the next run resumes from step 3 and its save puts the old step 6
    back before replacing it."""
    root = tmp_path / "ckpts"
    shared = [*SIX, f"checkpoint.dir={root}"]
    first = train_run(shared)
    assert first.code == 0, first.log()
    published = _saved_at(root / "step_00000006")

    again = train_run(
        [*shared, f"checkpoint.resume={root / 'step_00000003'}"],
        env={FAULT: "kill_between_renames:rank=0:step=6"},
    )
    assert again.code != 0
    _assert_resumed_from_step_3(again, first.losses)
    old, new = root / "step_00000006.replaced", root / "step_00000006.partial"
    assert _names(root) == ["latest", "step_00000003", new.name, old.name]
    assert (root / "latest").read_text() == "step_00000006"  # a missing directory
    assert verify(old) == [] and _saved_at(old) == published
    assert verify(new) == []  # finished, never renamed in
    with caplog.at_level(logging.WARNING, logger="moe_parallel.ckpt.checkpoint"):
        assert latest_checkpoint(root) == root / "step_00000003"
    assert caplog.records[-1].getMessage() == (
        f"checkpoint fallback: {root / 'latest'} names step_00000006, which is missing; "
        "using step_00000003, the newest verified checkpoint"
    )

    resumed = train_run(shared)  # checkpoint.resume=auto: the newest verified checkpoint
    assert resumed.code == 0, resumed.log()
    _assert_resumed_from_step_3(resumed, first.losses)
    log = resumed.log()
    assert "checkpoint fallback:" in log and "names step_00000006, which is missing" in log
    assert f"put {old} back as {root / 'step_00000006'}" in log
    assert _names(root) == ["latest", "step_00000003", "step_00000006"]
    assert latest_checkpoint(root) == root / "step_00000006"
    assert verify(root / "step_00000006") == []
    assert _saved_at(root / "step_00000006") > published


def _resumed_from_step_3(train_run, run, first: dict, fault: str | None):
    resumed = train_run(resume=str(run.run_dir), env={FAULT: fault} if fault else None)
    assert (resumed.code != 0) == (fault is not None), resumed.log()
    _assert_resumed_from_step_3(resumed, first)
    return resumed


def _assert_resumed_from_step_3(run, first: dict) -> None:
    event = run.event("resume")
    assert event["step"] == 3 and event["checkpoint"].endswith("step_00000003"), event
    for step in (4, 5, 6):  # later records of a step win: these are this run's
        got, want = run.losses[step], first[step]
        assert abs(got - want) <= 1e-6 * abs(want), (step, got, want)


def _names(root) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def _saved_at(path) -> float:
    return json.loads((path / "meta.json").read_text())["saved_at"]


def test_failed_save_is_recorded_and_training_goes_on(train_run):
    run = train_run(SIX, env={"MOE_PARALLEL_FAULT": "fail_save:rank=1:step=3"})
    assert run.code == 0, run.log()
    failed = run.event("save_failed")
    assert failed["step"] == 3 and "File too large" in failed["error"]
    assert failed["latest"] is None  # nothing older to fall back on; nothing half-written either
    assert max(run.losses) == 6
    root = run.run_dir / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000006"]
    assert verify(root / "step_00000006") == []


def test_too_many_failed_saves_stop_the_run(train_run):
    run = train_run(
        [*SIX, "checkpoint.max_consecutive_failed_saves=0"],
        env={"MOE_PARALLEL_FAULT": "fail_save:rank=1:step=3"},
    )
    assert run.code != 0
    assert "max_consecutive_failed_saves=0" in run.log()
    assert max(run.losses) == 3


def test_async_save_writes_the_state_of_its_step(train_run):
    import torch

    from moe_parallel.ckpt.inspect import read_tensors

    sync = train_run(SIX)
    background = train_run([*SIX, "checkpoint.async_save=true"])
    assert sync.code == 0 and background.code == 0, background.log()
    assert background.losses == sync.losses
    started = [r for r in background.records if r.get("event") == "save_started"]
    assert [r["step"] for r in started] == [3, 6]
    for step in ("step_00000003", "step_00000006"):
        a = read_tensors(sync.run_dir / "checkpoints" / step)
        b = read_tensors(background.run_dir / "checkpoints" / step)
        assert verify(background.run_dir / "checkpoints" / step) == []
        # Training went on during the background write of step 3: the snapshot must not move.
        for name in a:
            same = torch.equal(a[name], b[name]) if torch.is_tensor(a[name]) else a[name] == b[name]
            assert same, f"{step}: {name}"


def test_a_rank_with_two_threads_finishes_its_async_saves(train_run):
    """The checkpoint writer a CPU rank forks runs its copies on one thread: with the rank's
    OpenMP pool (2 threads) the forked writer hung in its first copy large enough to be split
    across threads (the vocabulary of 2048 here), and the run never ended."""
    four = ["train.steps=4", "train.warmup_steps=1", "checkpoint.interval=2"]
    one_rank = ["parallel.expert=1", "parallel.data=1", "data.tokenizer_vocab_size=2048"]
    run = train_run([*four, *one_rank, "checkpoint.async_save=true"], threads=2)
    assert run.code == 0, run.log()
    assert [r["step"] for r in run.records if r.get("event") == "save_started"] == [2, 4]
    for step in ("step_00000002", "step_00000004"):
        assert verify(run.run_dir / "checkpoints" / step) == []


def test_unwritable_checkpoint_directory_is_survived(train_run, tmp_path):
    import shutil
    import threading
    import time

    require(
        shutil.which("chattr") is not None,
        "chattr (e2fsprogs) is needed to make a directory unwritable for root",
    )
    probe = tmp_path / "probe"
    probe.mkdir()
    tried = subprocess.run(["chattr", "+i", str(probe)], capture_output=True, text=True)
    require(
        tried.returncode == 0,
        f"chattr +i on {tmp_path} failed (the filesystem lacks the immutable attribute, or "
        f"CAP_LINUX_IMMUTABLE is missing): {tried.stderr.strip()}",
    )
    subprocess.run(["chattr", "-i", str(probe)], check=True)

    root = tmp_path / "ckpts"
    locked = threading.Event()

    def lock_after_first_save():  # as if the volume went read-only mid-run
        deadline = time.time() + 300
        while time.time() < deadline and not (root / "latest").exists():
            time.sleep(0.02)
        subprocess.run(["chattr", "+i", str(root)], check=True)
        locked.set()

    watcher = threading.Thread(target=lock_after_first_save, daemon=True)
    watcher.start()
    try:
        run = train_run(
            [
                "train.steps=9",
                "train.warmup_steps=2",
                "checkpoint.interval=3",
                f"checkpoint.dir={root}",
                "checkpoint.max_consecutive_failed_saves=5",
            ]
        )
    finally:
        watcher.join(timeout=10)
        subprocess.run(["chattr", "-i", str(root)], check=False)
    assert locked.is_set()
    assert run.code == 0, run.log()
    assert max(run.losses) == 9  # training went on
    failed = [r for r in run.records if r.get("event") == "save_failed"]
    assert failed and failed[-1]["step"] == 9
    assert all("Permission" in r["error"] or "not permitted" in r["error"] for r in failed)
    latest = (root / "latest").read_text().strip()
    assert latest == failed[0]["latest"]
    assert verify(root / latest) == []


def test_killed_background_writer_is_a_failed_save(train_run):
    run = train_run(
        [*SIX, "checkpoint.async_save=true"],
        env={"MOE_PARALLEL_FAULT": "kill_writer:rank=1:step=3"},
    )
    assert run.code == 0, run.log()
    failed = run.event("save_failed")
    assert failed["latest"] is None
    root = run.run_dir / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_00000006"
    assert not (root / "step_00000003").exists()
    assert verify(root / "step_00000006") == []


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_failed_publish_is_a_failed_save_and_latest_stays(train_run, mode):
    # Every shard is written, then rank 0's publish (in a thread for async saves) fails.
    run = train_run(
        [*SIX, f"checkpoint.async_save={'true' if mode == 'async' else 'false'}"],
        env={"MOE_PARALLEL_FAULT": "fail_publish:rank=0:step=3"},
    )
    assert run.code == 0, run.log()
    failed = run.event("save_failed")
    assert "injected failure publishing the step-3 checkpoint" in failed["error"]
    assert failed["latest"] is None
    assert max(run.losses) == 6
    root = run.run_dir / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000006"]
    assert verify(root / "step_00000006") == []
    # The writers' chunk hashes were consumed into the manifest, not left beside it.
    assert not list((root / "step_00000006").glob("*.chunk-sha256.json"))
