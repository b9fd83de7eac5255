"""One run as every view shows it: state, step, loss, tokens/s, MFU, restarts, heartbeat age,
stragglers, and what each rank is doing (``heartbeats/rank{R}.json``, when the run writes them).

Reads ``state.json`` (corrected by the backend, as ``moectl status`` does), the last step record
of ``metrics.jsonl`` (read from the end of the file), ``heartbeat.json``, ``run_info.json`` and
the per-rank heartbeats. Fields a run does not write (older runs, monitor disabled) are None.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from cluster import RunLayout, RunRecord, backend_for_run, list_runs
from cluster.backend import BackendError
from cluster.registry import HEARTBEATS_DIR, read_heartbeat
from moe_parallel.monitor.run_info import read_run_info
from moe_parallel.views.mfu import mfu, unknown_gpu_note


@dataclass
class RankView:
    """One rank's last heartbeat; ages in seconds at the time of the summary."""

    rank: int
    host: str | None
    age_s: float | None
    step: int | None
    phase: str | None
    phase_s: float | None  # seconds in that phase
    collective: str | None  # the collective the rank is inside, None between collectives
    collective_s: float | None
    rss_bytes: int | None
    cuda_bytes: int | None


@dataclass
class RunSummary:
    path: Path
    backend: str
    status: str
    scheduler: str = ""
    job: str = ""
    step: int | None = None
    loss: float | None = None
    lr: float | None = None
    tokens_per_s: float | None = None
    mfu: float | None = None
    mfu_text: str = "-"
    restarts: int = 0
    ranks_text: str = ""  # ranks now; "1/2" while an elastic run runs shrunk
    heartbeat_age_s: float | None = None
    stragglers: list[dict] | None = None  # None: the run does not report stragglers
    dead_experts: dict | None = None  # layer -> dead experts; None: the run does not report them
    detail: str = ""
    notes: list[str] = field(default_factory=list)
    ranks: list[RankView] = field(default_factory=list)
    last_record: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.name


def summarize_all(root: Path | None, peak_tflops: float | None = None) -> list[RunSummary]:
    """Every run of the registry (``list_runs``), oldest first; unreadable ones say why."""
    out = []
    for entry in list_runs(root):
        if entry.record is None:
            out.append(RunSummary(entry.path, "?", "unreadable", detail=str(entry.error)))
        else:
            out.append(summarize(entry.path, entry.record, peak_tflops=peak_tflops))
    return out


def refreshed(run_dir: Path, record: RunRecord) -> tuple[RunRecord, str]:
    """The record (brought up to date by its backend, e.g. from SLURM or Ray when the job ended
    without recording why) and the scheduler's state of its job ("" for local runs)."""
    if not record.job_ids:  # nothing started yet: nothing to ask
        return record, ""
    try:
        backend = backend_for_run(run_dir, record)
        record = backend.refresh(run_dir)
        return record, backend.scheduler_state(record)
    except (BackendError, OSError, ValueError) as exc:
        if record.status.terminal:  # the scheduler may have forgotten an old job: nothing to say
            return record, ""
        return record, f"? ({str(exc).splitlines()[0][:80]})"


def summarize(
    run_dir: Path, record: RunRecord, peak_tflops: float | None = None, now: float | None = None
) -> RunSummary:
    now = time.time() if now is None else now
    record, scheduler = refreshed(run_dir, record)
    last, beat, info = (
        last_step_record(RunLayout(run_dir).metrics),
        read_heartbeat(run_dir),
        read_run_info(run_dir),
    )
    value, text = mfu(last.get("tokens_per_s"), info, peak_tflops)
    summary = RunSummary(
        path=run_dir,
        backend=record.backend,
        status=record.status.value,
        scheduler=scheduler,
        job=",".join(record.job_ids[-1:]),
        step=beat["step"] if beat else last.get("step"),
        loss=last.get("loss"),
        lr=last.get("lr"),
        tokens_per_s=last.get("tokens_per_s"),
        mfu=value,
        mfu_text=text,
        restarts=len(record.restarts),
        ranks_text=ranks_text(record),
        heartbeat_age_s=now - beat["time"] if beat else None,
        stragglers=last.get("stragglers"),
        dead_experts=last.get("moe/dead_experts"),
        detail=_detail(record),
        last_record=last,
        ranks=read_ranks(run_dir, now),
    )
    note = unknown_gpu_note(info) if peak_tflops is None else None
    if note:
        summary.notes.append(note)
    return summary


def ranks_text(record: RunRecord) -> str:
    """The run's ranks: its world size, or "now/configured" after an elastic resize."""
    if not record.resizes:
        return str(record.world_size)
    now = record.resizes[-1].to_world_size
    return str(now) if now == record.world_size else f"{now}/{record.world_size}"


def _detail(record: RunRecord) -> str:
    if record.failure_reason:
        return record.failure_reason.splitlines()[0]
    if record.restarts:
        last = record.restarts[-1]
        return f"{len(record.restarts)} restart(s); last: {last.kind}: {last.reason}"
    return ""


def last_step_record(path: Path, chunk: int = 1 << 16) -> dict:
    """The last step record (not an event) of a metrics.jsonl, read backwards from its end; an
    unfinished last line (the writer is mid-line) is skipped. {} when there is none."""
    if not path.is_file():
        return {}
    with open(path, "rb") as f:
        pos = f.seek(0, 2)
        tail = b""
        first = True
        while pos > 0:
            size = min(chunk, pos)
            pos -= size
            f.seek(pos)
            lines = (f.read(size) + tail).split(b"\n")
            if first:
                lines.pop()  # after the last newline: "" or an unfinished line
                first = False
            tail = lines.pop(0) if pos > 0 else b""
            for line in reversed(lines):
                if line.strip():
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise ValueError(
                            f"{path}: a line is not valid JSON ({exc}): {line[:200]!r}"
                        ) from exc
                    if "event" not in record:
                        return record
    return {}


def read_ranks(run_dir: Path, now: float) -> list[RankView]:
    """The per-rank heartbeats (``heartbeats/rank{R}.json``), by rank; [] when none exist."""
    folder = Path(run_dir) / HEARTBEATS_DIR
    if not folder.is_dir():
        return []
    views = []
    for path in folder.glob("rank*.json"):
        try:
            beat = json.loads(path.read_text())
        except json.JSONDecodeError as exc:  # written atomically: a bad file is a real problem
            raise ValueError(f"heartbeat {path} is not valid JSON: {exc}") from exc
        views.append(_rank_view(beat, now))
    return sorted(views, key=lambda v: v.rank)


def _rank_view(beat: dict, now: float) -> RankView:
    def since(key: str) -> float | None:
        return now - beat[key] if beat.get(key) is not None else None

    return RankView(
        rank=int(beat["rank"]),
        host=beat.get("host"),
        age_s=since("time"),
        step=beat.get("step"),
        phase=beat.get("phase"),
        phase_s=since("phase_since"),
        collective=beat.get("collective"),
        collective_s=since("collective_since"),
        rss_bytes=beat.get("rss_bytes"),
        cuda_bytes=beat.get("cuda_allocated_bytes"),
    )


# ----------------------------------------------------------------------------------- formatting
def age_text(seconds: float | None) -> str:
    if seconds is None:
        return ""
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


def stragglers_text(stragglers: list[dict] | None) -> str:
    """'' when the run does not report stragglers, 'none', or 'rank 1 (n1) x1.42, ...'."""
    if stragglers is None:
        return ""
    if not stragglers:
        return "none"
    return ", ".join(
        f"rank {s['rank']}"
        + (f" ({s['host']})" if s.get("host") else "")
        + (f" x{s['ratio']:.2f}" if s.get("ratio") is not None else "")
        for s in stragglers
    )


def dead_experts_text(dead: dict | None) -> str:
    """'' when the run does not report dead experts, 'none', or 'layer 2: 1, 3; layer 3: 0'."""
    if dead is None:
        return ""
    layers = sorted((k for k, v in dead.items() if v), key=int)
    if not layers:
        return "none"
    return "; ".join(f"layer {k}: {', '.join(map(str, dead[k]))}" for k in layers)


def bytes_text(n: int | None) -> str:
    if n is None:
        return ""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def row(s: RunSummary) -> list[str]:
    """The ``moectl status`` table row (and the dashboard's cells)."""
    return [
        s.name,
        s.backend,
        s.status,
        s.scheduler,
        s.job,
        "" if s.step is None else str(s.step),
        "" if s.loss is None else f"{s.loss:.4f}",
        "" if s.tokens_per_s is None else f"{s.tokens_per_s:.0f}",
        s.mfu_text,
        str(s.restarts),
        s.ranks_text,
        age_text(s.heartbeat_age_s),
        stragglers_text(s.stragglers),
        s.detail,
    ]


COLUMNS = [
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
