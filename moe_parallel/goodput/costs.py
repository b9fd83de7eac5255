"""Recovery costs of a config at a cluster size, from the project's own figures.

- checkpoint bytes per rank: the planner's weights and optimizer shard (plan/memory.py) for the
  config's model-parallel shape at ``gpus`` GPUs (data-parallel size = gpus / (TP x PP x CP));
  a load reads what a rank holds (weights + its optimizer shard); a save writes the state once
  (Megatron's fully parallel save spreads the replicated weights over their replicas): the
  optimizer shard plus the weights over the group that replicates them (expert data-parallel
  group for a MoE, the smaller one, so the larger share);
- save / load time: a node's bytes over the storage bandwidth per node (cluster profile
  ``storage.bandwidth_per_node_gb_s``);
- save blocking: with ``checkpoint.async_save`` the checkpoint benchmark's measured blocking
  ratio times the synchronous save time, else the synchronous save time;
- detection: ``monitor.heartbeat_interval`` for a crash, ``monitor.hang_timeout`` for a hang;
- process start-up: measured by the SLURM / Ray latency benchmarks (benchmarks/results/);
- process-group initialisation: ``pg_init_per_rank_s`` x world size, 3 ms by default. An
  assumption: meant to follow MegaScale (Jiang et al., NSDI 2024), whose fast-initialisation
  section is remembered as under 5 s for 2,048 GPUs and under 30 s for more than 10,000 (about
  2.5-3 ms per rank), but the passage could not be retrieved to check it (docs/goodput.md);
- replacement: a node that left is replaced after ``replacement_delay_s`` (an assumption: no
  published figure of Llama 3's; 600 s by default);
- spare nodes: ``--spares`` or the profile's ``slurm.spare_nodes`` idle nodes take a lost
  node's place at once (no wait, no shrink) while one is free; the lost node rejoins them after
  ``replacement_delay_s``;
- elastic: the run waits ``recovery.wait_for_capacity_s`` and then goes on at the largest
  data-parallel size its rules allow (config/recovery.py) without the replicas that had ranks on
  the lost node (Megatron's rank order puts TP x CP innermost, so a node of G GPUs holds
  G / (TP x CP) replicas' ranks of one pipeline stage).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from cluster.profile import ClusterProfile

from ..config import RunConfig
from ..config.recovery import elastic_sizes
from ..plan.layouts import padded_vocab as layout_padded_vocab
from ..plan.memory import Layout, static_memory
from .simulate import RecoveryCosts

MEASURED_COSTS = (
    Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "recovery_costs.json"
)
# Assumed (docs/goodput.md): MegaScale's remembered "< 30 s for > 10,000 GPUs", not verified.
PG_INIT_PER_RANK_S = 0.003
REPLACEMENT_DELAY_S = 600.0  # assumed; Llama 3 does not publish its replacement time
GB = 1e9


class GoodputInputError(ValueError):
    """A cluster size, interval or cost that cannot be simulated."""


@dataclass(frozen=True)
class ScaleChoices:
    """What the config does not say: the cluster, and the costs outside the project."""

    gpus: int
    backend: str = "slurm"  # whose measured restart: slurm or ray
    replacement_delay_s: float = REPLACEMENT_DELAY_S
    pg_init_per_rank_s: float = PG_INIT_PER_RANK_S
    measured: Path = MEASURED_COSTS
    spare_nodes: int | None = None  # None: the cluster profile's slurm.spare_nodes


def replica_size(cfg: RunConfig) -> int:
    p = cfg.parallel
    return p.tensor * p.pipeline * p.context


def at_scale(
    cfg: RunConfig, gpus: int, global_batch_size: int | None = None, mode: str | None = None
) -> RunConfig:
    """``cfg`` on ``gpus`` GPUs: same model-parallel shape, data-parallel size gpus / replica,
    global batch ``global_batch_size`` or, by default, the config's rounded up to a multiple of
    micro-batch x data-parallel size (the config's rules check it); ``mode``: its ``recovery.mode`` (None: the config's),
    validated at that size (a layout may shrink at 2,048 replicas and not at 8)."""
    size = replica_size(cfg)
    if gpus < size or gpus % size:
        why = "smaller than one replica" if gpus < size else "not a multiple"
        raise GoodputInputError(
            f"--gpus={gpus}: must be a multiple of one model replica, tensor x pipeline x "
            f"context = {size} GPUs ({why})"
        )
    data = gpus // size
    per_step = cfg.train.micro_batch_size * data  # the global batch is a multiple of this
    batch = global_batch_size or -(-cfg.train.global_batch_size // per_step) * per_step
    raw = cfg.model_dump()
    raw["parallel"]["data"] = data
    raw["train"]["global_batch_size"] = batch
    raw["recovery"]["mode"] = mode or cfg.recovery.mode
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:  # the config's own rule, said once, with the size
        rule = exc.errors()[0]["msg"].removeprefix("Value error, ")
        raise GoodputInputError(
            f"--gpus={gpus} (data-parallel size {data}, global batch {batch}): {rule}"
        ) from None


def padded_vocab(cfg: RunConfig) -> int:
    """The vocabulary as Megatron pads it for the config's own layout (the planner's rule)."""
    return layout_padded_vocab(cfg, Layout.of(cfg))


def checkpoint_bytes(cfg: RunConfig) -> tuple[int, int]:
    """(bytes a rank loads, bytes a rank saves), worst pipeline stage, from the planner."""
    layout, vocab = Layout.of(cfg), padded_vocab(cfg)
    replicated_over = layout.expert_data if cfg.model.moe else layout.data * layout.context
    load = save = 0
    for stage in range(layout.pipeline):
        st = static_memory(cfg.model, layout, vocab, stage)
        load = max(load, st["weights"] + st["optimizer"])
        save = max(save, st["optimizer"] + -(-st["weights"] // replicated_over))
    return load, save


def read_measured(path: Path, section: str, names: tuple[str, ...]) -> dict[str, float]:
    """Figures of one benchmark from the results file; the error says how to produce them."""
    data = json.loads(Path(path).read_text()) if Path(path).is_file() else {}
    found = data.get(section, {})
    missing = [n for n in names if n not in found]
    if missing:
        raise GoodputInputError(
            f"{path}: no {section} figure(s) {missing}; run python benchmarks/{section}.py --record"
        )
    return {n: float(found[n]) for n in names}


def process_start_s(choices: ScaleChoices) -> tuple[float, str]:
    """Measured: from a stopped job to its first step again (requeue + start + load + step)."""
    if choices.backend == "slurm":
        m = read_measured(
            choices.measured, "slurm_latency", ("stopped_to_restart_s", "restart_to_step_s")
        )
        return m["stopped_to_restart_s"] + m[
            "restart_to_step_s"
        ], "slurm_latency: requeue + restart to step"
    if choices.backend == "ray":
        m = read_measured(choices.measured, "ray_latency", ("kill_to_resumed_step_s",))
        return m["kill_to_resumed_step_s"], "ray_latency: kill to resumed step"
    raise GoodputInputError(f"--backend={choices.backend!r}: allowed slurm, ray")


def recovery_costs(cfg: RunConfig, profile: ClusterProfile, choices: ScaleChoices) -> RecoveryCosts:
    """The costs of ``cfg`` (already :func:`at_scale`) on the profile's storage."""
    if cfg.monitor.hang_timeout is None:
        raise GoodputInputError(
            "monitor.hang_timeout=null: hangs would never be detected; set a timeout in seconds"
        )
    for name in ("replacement_delay_s", "pg_init_per_rank_s"):
        if getattr(choices, name) < 0:
            raise GoodputInputError(f"{name}={getattr(choices, name)}: must be >= 0")
    spares = profile.slurm.spare_nodes if choices.spare_nodes is None else choices.spare_nodes
    if isinstance(spares, bool) or not isinstance(spares, int) or spares < 0:
        raise GoodputInputError(f"--spares={spares!r}: must be a whole number of nodes >= 0")
    load_b, save_b = checkpoint_bytes(cfg)
    node_bw = profile.storage.bandwidth_per_node_gb_s * GB
    per_node = profile.storage.gpus_per_node
    load_s, write_s = load_b * per_node / node_bw, save_b * per_node / node_bw
    ratio = read_measured(choices.measured, "checkpoint_save", ("async_blocking_ratio",))[
        "async_blocking_ratio"
    ]
    blocking = ratio * write_s if cfg.checkpoint.async_save else write_s
    start, start_source = process_start_s(choices)
    return RecoveryCosts(
        detect_crash_s=cfg.monitor.heartbeat_interval,
        detect_hang_s=cfg.monitor.hang_timeout,
        replacement_delay_s=choices.replacement_delay_s,
        process_start_s=start,
        process_group_init_s=choices.pg_init_per_rank_s * cfg.world_size,
        load_s=load_s,
        save_blocking_s=blocking,
        save_write_s=write_s,
        mode=cfg.recovery.mode,
        spare_nodes=spares,
        wait_for_capacity_s=cfg.recovery.wait_for_capacity_s,
        shrunk_fraction=shrunk_fraction(cfg, per_node),
        grow_back=cfg.recovery.grow_back,
        sources={
            "load_bytes_per_rank": load_b,
            "save_bytes_per_rank": save_b,
            "storage_gb_s_per_node": profile.storage.bandwidth_per_node_gb_s,
            "async_blocking_ratio": ratio if cfg.checkpoint.async_save else None,
            "process_start": start_source,
            "pg_init_per_rank_s": choices.pg_init_per_rank_s,
        },
    )


def shrunk_fraction(cfg: RunConfig, gpus_per_node: int) -> float:
    """Throughput after losing one node, for ``recovery.mode: elastic`` (1 otherwise)."""
    if cfg.recovery.mode != "elastic":
        return 1.0
    p = cfg.parallel
    lost = max(1, gpus_per_node // (p.tensor * p.context))
    sizes = [d for d in elastic_sizes(cfg)[0] if d <= p.data - lost]
    return sizes[0] / p.data if sizes else 0.0
