"""Checkpoints that cannot be silently wrong: manifests, verification, interrupted saves."""

from __future__ import annotations

import subprocess
import sys

import pytest

from moe_parallel.ckpt.manifest import read_manifest, verify
from tests.conftest import REPO

pytestmark = pytest.mark.integration

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


def test_kill_in_the_middle_of_a_save_keeps_latest_good(train_run):
    run = train_run(SIX, env={"MOE_PARALLEL_FAULT": "kill_in_save:rank=0:step=6"})
    assert run.code != 0
    root = run.run_dir / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_00000003"
    assert verify(root / "step_00000003") == []
    assert not (root / "step_00000006").exists()  # the half-written save is only a .partial
    resumed = train_run(resume=str(run.run_dir))
    assert resumed.code == 0, resumed.log()
    assert "resumed from" in resumed.log() and "step_00000003" in resumed.log()
    assert not list(root.glob("*.partial"))  # cleaned by the next save
    assert verify(root / "step_00000006") == []


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


def test_unwritable_checkpoint_directory_is_survived(train_run, tmp_path):
    import shutil
    import threading
    import time

    if shutil.which("chattr") is None:
        pytest.skip("chattr (e2fsprogs) is needed to make a directory unwritable for root")
    probe = tmp_path / "probe"
    probe.mkdir()
    if subprocess.run(["chattr", "+i", str(probe)], capture_output=True).returncode != 0:
        pytest.skip("this filesystem does not support the immutable attribute")
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
