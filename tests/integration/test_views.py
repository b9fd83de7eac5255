"""The views (#8): ``moectl status`` over local, SLURM and Ray runs, ``moectl watch --once``,
``moectl plot`` (the data behind every PNG), ``moectl dashboard`` in headless Chromium, and the
W&B offline log of the same scalars. One short real local run (6 steps, 2 ranks, EP2, held-out
evaluation, W&B offline) is shared by every test of the module."""

from __future__ import annotations

import glob
import html.parser
import json
import math
import shutil
import struct
import subprocess
import threading
from pathlib import Path

import pytest

from cluster import RunRecord, list_runs, new_run_dir, read_record, write_record
from cluster.registry import Restart, now_iso
from cluster.state import RunState
from launch.cli import main
from tests.conftest import TEST_DATA, TINY, Run

pytestmark = pytest.mark.integration

STEPS = 6


@pytest.fixture(scope="module")
def registry(tmp_path_factory, data_cache):
    """A runs root with a real local run, and a SLURM and a Ray run recorded through the
    registry's own API (a SLURM run as ``submit`` writes it before the job id is known, a Ray run
    that failed after one restart)."""
    from moe_parallel.launch_run import launch_local, plan_train

    root = tmp_path_factory.mktemp("views") / "runs"
    overrides = [
        *TEST_DATA,
        f"data.cache_dir={data_cache}",
        "log.tensorboard=false",
        f"train.steps={STEPS}",
        "train.warmup_steps=1",
        "train.eval_interval=3",
        "train.eval_steps=1",
        "data.split=90,10,0",
        "checkpoint.save_at_end=false",
        "log.wandb=true",
        "log.wandb_mode=offline",
        "log.wandb_project=views-test",
    ]
    launch = plan_train(TINY, overrides, str(root), None, None)
    assert launch_local(launch, stream=False) == 0
    slurm = new_run_dir(root, "slurm-run")
    write_record(
        slurm,
        RunRecord(backend="slurm", status=RunState.PENDING, world_size=4, created_at=now_iso()),
    )
    ray = new_run_dir(root, "ray-run")
    write_record(
        ray,
        RunRecord(
            backend="ray",
            status=RunState.FAILED,
            world_size=2,
            job_ids=["moe-ray-run-1"],
            created_at=now_iso(),
            ended_at=now_iso(),
            restarts=[
                Restart(
                    at=now_iso(),
                    reason="rank 1 on 10.78.0.11 failed: its node was lost",
                    attempt=1,
                    kind="failed",
                    step=3,
                )
            ],
            failure_reason="rank 0 exited with code 1 twice at step 3",
        ),
    )
    return {"root": root, "local": Run(0, launch.run_dir), "slurm": slurm, "ray": ray}


def _table_rows(text: str) -> dict[str, list[str]]:
    """Rich table rows by run name (the first line of each row: name, backend, status, ...)."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("│"):
            cells = [c.strip() for c in line.strip("│").split("│")]
            if cells[0]:
                rows[cells[0]] = cells
    return rows


def test_status_shows_local_slurm_and_ray_runs_in_one_table(registry, capsys):
    assert main(["status", "--runs", str(registry["root"])]) == 0
    rows = _table_rows(capsys.readouterr().out)
    local = registry["local"]
    expected = {
        local.run_dir.name: ("local", "completed"),
        registry["slurm"].name: ("slurm", "pending"),
        registry["ray"].name: ("ray", "failed"),
    }
    assert {name: tuple(cells[1:3]) for name, cells in rows.items()} == expected
    columns = [
        "run",
        "backend",
        "status",
        "scheduler",
        "job",
        "step",
        "loss",
        "tokens/s",
        "MFU",
        "restarts",
        "ranks",
        "heartbeat",
        "stragglers",
        "detail",
    ]
    cells = dict(zip(columns, rows[local.run_dir.name]))
    last = local.steps[-1]
    assert cells["step"] == str(STEPS) and cells["loss"] == f"{last['loss']:.4f}"
    assert cells["tokens/s"] == f"{last['tokens_per_s']:.0f}"
    assert cells["MFU"] == "-"  # CPU ranks
    assert cells["restarts"] == "0" and cells["heartbeat"].endswith("ago")
    assert cells["ranks"] == "2"
    from moe_parallel.views.summary import stragglers_text

    assert "stragglers" in last, sorted(last)  # the straggler monitor is on by default
    assert cells["stragglers"] == stragglers_text(last["stragglers"])
    ray = dict(zip(columns, rows[registry["ray"].name]))
    assert ray["restarts"] == "1" and ray["job"] == "moe-ray-run-1"
    assert ray["detail"].startswith("rank 0 exited with code 1")


def test_run_info_holds_the_planners_flops_per_token(registry):
    from moe_parallel.config import load_config
    from moe_parallel.monitor.run_info import read_run_info
    from moe_parallel.plan.params import describe

    run_dir = registry["local"].run_dir
    info = read_run_info(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    cfg.model.vocab_size = info["vocab_size"]
    assert info["device"] == "cpu" and info["gpu"] is None and info["ranks"] == 2
    assert info["train_flops_per_token"] == describe(cfg)["train_flops_per_token"] > 0


def test_watch_once_shows_the_run_and_every_rank(registry, capsys):
    run_dir = registry["local"].run_dir
    assert main(["watch", str(run_dir), "--once"]) == 0
    out = capsys.readouterr().out
    last = registry["local"].steps[-1]
    assert run_dir.name in out and "state completed" in out and "backend local" in out
    assert f"step {STEPS}" in out and f"loss {last['loss']:.4f}" in out
    assert f"tokens/s {last['tokens_per_s']:.0f}" in out
    from moe_parallel.views.summary import dead_experts_text

    assert "moe/dead_experts" in last, sorted(last)  # the dead-expert tracker is on by default
    assert f"dead experts {dead_experts_text(last['moe/dead_experts']) or '-'}" in out
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip("│").split("│")]
        if line.startswith("│") and len(cells) == 8 and cells[1].isdigit():
            rows[int(cells[1])] = cells  # node, rank, heartbeat, step, phase, collective, memory
    assert sorted(rows) == [0, 1]
    for rank, cells in rows.items():
        beat = json.loads((run_dir / "heartbeats" / f"rank{rank}.json").read_text())
        assert cells[3] == str(beat["step"]) == str(STEPS)
        assert cells[4].startswith(beat["phase"])
        assert cells[6].endswith(("MiB", "GiB"))  # RSS
    assert rows[0][0] == json.loads((run_dir / "heartbeats" / "rank0.json").read_text())["host"]


def test_plot_pngs_hold_the_logged_values(registry, tmp_path, capsys):
    import matplotlib.image

    local = registry["local"]
    out = tmp_path / "plots"
    assert main(["plot", str(local.run_dir), "--out", str(out)]) == 0
    printed = capsys.readouterr().out.split()
    steps = local.steps
    xs = [float(r["step"]) for r in steps]
    for name in ("loss", "lr", "tokens_per_s"):
        series = json.loads((out / f"{name}.json").read_text())["lines"][name]
        assert series == {"x": xs, "y": [float(r[name]) for r in steps]}, name
    evals = [r for r in local.records if r.get("event") == "eval"]
    assert [e["step"] for e in evals] == [3, 6]
    valid = json.loads((out / "loss.json").read_text())["lines"]["valid_loss"]
    assert valid == {"x": [3.0, 6.0], "y": [e["valid_loss"] for e in evals]}
    layers = sorted(steps[0]["moe/tokens_per_expert"], key=int)
    assert len(layers) == 4
    for layer in layers:
        (image,) = json.loads((out / f"expert_load_layer{layer}.json").read_text())["images"]
        assert image["steps"] == [r["step"] for r in steps]
        loads_SE = [r["moe/tokens_per_expert"][layer] for r in steps]
        assert image["array"] == [list(col) for col in zip(*loads_SE)], layer  # experts x steps
    expected = [
        "loss",
        "lr",
        "tokens_per_s",
        *[f"expert_load_layer{layer}" for layer in layers],
        "imbalance",
    ]
    for key, name in (("moe/imbalance", "imbalance"), ("moe/router_entropy", "router_entropy")):
        assert all(key in r for r in steps), (key, sorted(steps[-1]))  # the monitor is on
        if name != "imbalance":
            expected.append(name)
        lines = json.loads((out / f"{name}.json").read_text())["lines"]
        assert lines == {
            f"layer {layer}": {"x": xs, "y": [r[key][layer] for r in steps]} for layer in layers
        }, name
    # Per-rank step times (the straggler monitor, on by default).
    assert all("rank_compute_s" in r for r in steps), sorted(steps[-1])
    expected.append("step_time_ranks")
    lines = json.loads((out / "step_time_ranks.json").read_text())["lines"]
    for rank in range(2):
        compute = [r["rank_compute_s"][rank] for r in steps]
        assert lines[f"rank {rank} compute"]["y"] == compute
    assert lines["step time"]["y"] == [r["step_time_s"] for r in steps]
    assert printed == [str(out / f"{name}.png") for name in expected]
    for name in expected:
        png = out / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
        pixels = matplotlib.image.imread(png)
        assert pixels.shape[:2] == (450, 800) and pixels.std() > 0.05, name


class _Rows(html.parser.HTMLParser):
    """Rows of the dashboard's table (data-run, data-state) and the text of their status cell."""

    def __init__(self):
        super().__init__()
        self.rows, self.images, self._row, self._in_state = {}, [], None, False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "tr" and "data-run" in a:
            self._row = a["data-run"]
            self.rows[self._row] = {"state": a["data-state"], "backend": a["data-backend"]}
        elif tag == "td" and self._row and "state" in (a.get("class") or "").split():
            self._in_state = True
        elif tag == "img":
            self.images.append(a["src"])

    def handle_endtag(self, tag):
        if tag == "td":
            self._in_state = False

    def handle_data(self, data):
        if self._in_state:
            self.rows[self._row]["cell"] = data.strip()


def _chromium_dom(url: str, profile: Path) -> str:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.fail(
            "chromium is not installed: the dashboard test loads the page in headless "
            "Chromium; install Debian's package (apt-get install -y chromium; .ci/run "
            "installs it when missing)"
        )
    done = subprocess.run(
        [
            binary,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert done.returncode == 0, f"chromium failed ({done.returncode}): {done.stderr[-2000:]}"
    return done.stdout


def test_dashboard_in_headless_chromium_shows_every_run_with_its_state(registry, tmp_path):
    import urllib.request

    from moe_parallel.views.dashboard import make_server

    server = make_server(registry["root"], port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert server.server_address[0] == "127.0.0.1"
        page = _Rows()
        page.feed(_chromium_dom(base + "/", tmp_path / "profile1"))
        entries = list_runs(registry["root"])
        assert len(entries) == 3
        assert page.rows == {
            e.path.name: {
                "state": read_record(e.path).status.value,
                "backend": e.record.backend,
                "cell": read_record(e.path).status.value,
            }
            for e in entries
        }
        local = registry["local"].run_dir.name
        plots = _Rows()
        plots.feed(_chromium_dom(f"{base}/runs/{local}/plots", tmp_path / "profile2"))
        assert f"/runs/{local}/plots/loss.png" in plots.images
        assert f"/runs/{local}/plots/expert_load_layer0.png" in plots.images
        for src in plots.images:
            with urllib.request.urlopen(base + src, timeout=30) as response:
                assert response.headers["Content-Type"] == "image/png"
                assert response.read()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        server.shutdown()
        server.server_close()


def _wandb_history(run_dir: Path) -> dict[int, dict]:
    """The history rows of the run's offline W&B file (LevelDB-log framing of protobuf
    records: 32 KiB blocks, 7-byte chunk headers)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B"
    pos, pending, history = 7, b"", {}
    while pos < len(data):
        left = 32768 - pos % 32768
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (length == 0 and kind == 0):
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            if record.WhichOneof("record_type") == "history":
                row = {
                    i.key or "/".join(i.nested_key): json.loads(i.value_json)
                    for i in record.history.item
                }
                history[row["_step"]] = row
    return history


def test_wandb_offline_logs_the_same_scalars(registry):
    from moe_parallel.train.metrics import scalars

    local = registry["local"]
    history = _wandb_history(local.run_dir)
    assert sorted(history) == list(range(1, STEPS + 1))
    for record in local.steps:
        expected = scalars(record)
        assert "moe/imbalance/layer_0" in expected and "loss" in expected
        row = history[record["step"]]
        for key, value in expected.items():
            assert math.isclose(row[key], value, rel_tol=1e-12), (record["step"], key)
