"""``moectl plot RUN``: PNGs of a run's metrics (matplotlib, Agg, no display needed).

- ``loss.png``: training loss per step, held-out loss (``eval`` events) when present
- ``lr.png``: learning rate per step
- ``tokens_per_s.png``: throughput per step
- ``expert_load_layer{L}.png``: per MoE layer, tokens routed to each expert (rows) per step
  (columns); layer numbers as in ``moe/tokens_per_expert``
- ``imbalance.png``, ``router_entropy.png``: one line per MoE layer (max / mean expert load;
  the router's entropy, when the run logs it)
- ``step_time_ranks.png``: per rank, compute and communication seconds per step, when the run
  reports them (``rank_compute_s``, ``rank_comm_s``: the straggler monitor), with the step time

Next to each PNG, ``NAME.json`` holds the series drawn, read back from the figure itself (each
line's x and y, each heatmap's array with its steps), so scripts and tests can check what a
picture shows. A step logged twice (a run restarted from a checkpoint before it) is drawn with
its last record: the one the finished run's weights followed.
"""

from __future__ import annotations

import json
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from cluster import RunLayout
from moe_parallel.train.metrics import read_metrics

PLOTS_DIR = "plots"
# per-layer values drawn as one line per layer: (record key, file name, axis label)
PER_LAYER = [
    ("moe/imbalance", "imbalance", "expert load imbalance (max / mean)"),
    ("moe/router_entropy", "router_entropy", "router entropy (nats)"),
]


def step_records(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(step records by step, the last one of each step; event records, in order)."""
    by_step, events = {}, []
    for record in read_metrics(RunLayout(run_dir).metrics):
        if "event" in record:
            events.append(record)
        else:
            by_step[record["step"]] = record
    return [by_step[s] for s in sorted(by_step)], events


def plot_run(run_dir: Path, out_dir: Path | None = None) -> list[Path]:
    """Write every plot the run's metrics allow; returns the PNG paths."""
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir / PLOTS_DIR
    steps, events = step_records(run_dir)
    if not steps:
        raise ValueError(f"{RunLayout(run_dir).metrics} has no step records yet: nothing to plot")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [
        _save(_curves(steps, events, "loss"), out_dir / "loss.png"),
        _save(_curves(steps, [], "lr"), out_dir / "lr.png"),
        _save(_curves(steps, [], "tokens_per_s"), out_dir / "tokens_per_s.png"),
    ]
    for layer in _moe_layers(steps):
        written.append(_save(_expert_load(steps, layer), out_dir / f"expert_load_layer{layer}.png"))
    for key, name, label in PER_LAYER:
        if any(r.get(key) for r in steps):
            written.append(_save(_per_layer(steps, key, label), out_dir / f"{name}.png"))
    if any("rank_compute_s" in r for r in steps):
        written.append(_save(_rank_times(steps), out_dir / "step_time_ranks.png"))
    return written


def _figure(title: str, xlabel: str, ylabel: str):
    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return fig, ax


def _curves(steps: list[dict], events: list[dict], key: str) -> Figure:
    labels = {"loss": "loss", "lr": "learning rate", "tokens_per_s": "tokens/s"}
    fig, ax = _figure(labels[key], "step", labels[key])
    xs = [r["step"] for r in steps if r.get(key) is not None]
    ax.plot(
        xs,
        [r[key] for r in steps if r.get(key) is not None],
        label=key,
        marker="." if len(xs) < 50 else None,
    )
    if key == "loss":
        evals = {e["step"]: e["valid_loss"] for e in events if e.get("event") == "eval"}
        if evals:
            ax.plot(
                sorted(evals), [evals[s] for s in sorted(evals)], label="valid_loss", marker="o"
            )
        ax.legend()
    return fig


def _moe_layers(steps: list[dict]) -> list[str]:
    layers = set()
    for r in steps:
        layers.update(r.get("moe/tokens_per_expert", {}))
    return sorted(layers, key=int)


def _expert_load(steps: list[dict], layer: str) -> Figure:
    rows = [r for r in steps if layer in r.get("moe/tokens_per_expert", {})]
    xs = [r["step"] for r in rows]
    loads_SE = [r["moe/tokens_per_expert"][layer] for r in rows]
    num_experts = len(loads_SE[0])
    loads_ES = [[load[e] for load in loads_SE] for e in range(num_experts)]
    fig, ax = _figure(f"expert load, layer {layer}", "step", "expert")
    ax.grid(False)
    image = ax.imshow(
        loads_ES,
        aspect="auto",
        interpolation="nearest",
        cmap="viridis",
        extent=(-0.5, len(xs) - 0.5, num_experts - 0.5, -0.5),
    )
    ticks = list(range(0, len(xs), max(1, len(xs) // 10)))
    ax.set_xticks(ticks, [str(xs[i]) for i in ticks])
    ax.set_yticks(range(num_experts))
    fig.colorbar(image, ax=ax, label="tokens routed")
    image.moe_steps = xs  # the column -> step map, written with the array (see _series)
    return fig


def _per_layer(steps: list[dict], key: str, label: str) -> Figure:
    fig, ax = _figure(label, "step", label)
    layers = sorted({layer for r in steps for layer in r.get(key) or {}}, key=int)
    for layer in layers:
        rows = [r for r in steps if layer in (r.get(key) or {})]
        ax.plot([r["step"] for r in rows], [r[key][layer] for r in rows], label=f"layer {layer}")
    ax.legend(fontsize="small")
    return fig


def _rank_times(steps: list[dict]) -> Figure:
    rows = [r for r in steps if "rank_compute_s" in r]
    xs = [r["step"] for r in rows]
    fig, ax = _figure("step time per rank", "step", "seconds")
    for rank in range(len(rows[0]["rank_compute_s"])):
        line = ax.plot(xs, [r["rank_compute_s"][rank] for r in rows], label=f"rank {rank} compute")[
            0
        ]
        if all("rank_comm_s" in r for r in rows):
            ax.plot(
                xs,
                [r["rank_comm_s"][rank] for r in rows],
                linestyle="--",
                color=line.get_color(),
                label=f"rank {rank} communication",
            )
    ax.plot(xs, [r["step_time_s"] for r in rows], color="black", linewidth=1, label="step time")
    ax.legend(fontsize="small", ncol=2)
    return fig


def _series(fig: Figure) -> dict:
    """What the figure draws: every line's data, every image's array (with its steps)."""
    out = {"lines": {}, "images": []}
    for ax in fig.axes:
        for line in ax.get_lines():
            out["lines"][line.get_label()] = {
                "x": [float(v) for v in line.get_xdata()],
                "y": [float(v) for v in line.get_ydata()],
            }
        for image in ax.get_images():
            out["images"].append(
                {
                    "title": ax.get_title(),
                    "steps": getattr(image, "moe_steps", None),
                    "array": image.get_array().tolist(),
                }
            )
    return out


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, format="png")
    path.with_suffix(".json").write_text(json.dumps(_series(fig)))
    return path
