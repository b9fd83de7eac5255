"""The goodput PNG: ETTR against the checkpoint interval, and against the cluster size."""

from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def plot_goodput(result: dict, path: Path) -> Path:
    """Two panels from :func:`moe_parallel.goodput.report.goodput`'s result; returns ``path``."""
    fig = Figure(figsize=(11, 4.2))
    FigureCanvasAgg(fig)
    by_interval, by_size = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    xs, ys = zip(*result["curve"])
    by_interval.plot([x / 60 for x in xs], ys, marker=".")
    by_interval.axvline(result["best_interval_s"] / 60, ls="--", c="g", label="best")
    by_interval.axvline(result["young_daly_interval_s"] / 60, ls=":", c="r", label="Young/Daly")
    by_interval.set(
        xscale="log",
        xlabel="checkpoint interval (minutes)",
        ylabel="ETTR",
        title=f"{result['config']}, {result['gpus']} GPUs, {result['days']:g} days",
    )
    by_interval.legend()
    sizes = [s for s in result.get("by_cluster_size", []) if "ettr" in s]
    if sizes:
        by_size.plot([s["gpus"] for s in sizes], [s["ettr"] for s in sizes], marker="o")
    by_size.set(
        xscale="log",
        xlabel="GPUs",
        ylabel="ETTR at the best interval",
        title=f"recovery: {result['recovery']['mode']}, "
        f"{result['recovery']['spare_nodes']} spare node(s) at every size",
    )
    for ax in (by_interval, by_size):
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return Path(path)
