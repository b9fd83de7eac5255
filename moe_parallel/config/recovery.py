"""Elastic recovery's layouts: the data-parallel sizes a run may shrink to.

A run shrinks by data-parallel replicas only: tensor, pipeline, context, expert and expert-tensor
sizes stay as configured (the checkpoint reshards to the new data-parallel size), and the global
batch stays the same (each replica runs more micro-batches), so the run computes the same steps.
A size is allowed when every rule of a run config holds for it (the global batch divides into
micro-batches over the replicas; EP x ETP divides the ranks of a pipeline stage; ...).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from cluster.elastic import ElasticSpec
from cluster.env import DATA_PARALLEL_ENV

if TYPE_CHECKING:
    from .schema import RunConfig


def with_data_parallel(cfg: "RunConfig", data: int) -> "RunConfig":
    """The config with ``parallel.data`` set to ``data`` (every other field as it is)."""
    return cfg.model_copy(update={"parallel": cfg.parallel.model_copy(update={"data": data})})


def elastic_sizes(cfg: "RunConfig") -> tuple[list[int], dict[int, str]]:
    """(the data-parallel sizes from ``parallel.data`` down to ``recovery.min_data_parallel``
    whose layouts are valid, largest first; why each other size in that range is not)."""
    from .rules import check_run

    sizes, refused = [cfg.parallel.data], {}
    for data in range(cfg.parallel.data - 1, cfg.recovery.min_data_parallel - 1, -1):
        try:
            check_run(with_data_parallel(cfg, data))
        except ValueError as why:  # the rule's own message is the reason this size is refused
            refused[data] = str(why)
            continue
        sizes.append(data)
    return sizes, refused


def check_recovery(cfg: "RunConfig") -> None:
    r, data = cfg.recovery, cfg.parallel.data
    if r.min_data_parallel > data:
        raise ValueError(
            f"recovery.min_data_parallel={r.min_data_parallel} is above parallel.data={data}: "
            f"allowed 1..{data}"
        )
    if r.mode != "elastic":
        return
    sizes, refused = elastic_sizes(cfg)
    if len(sizes) == 1:
        why = "; ".join(f"parallel.data={d}: {reason}" for d, reason in sorted(refused.items()))
        raise ValueError(
            f"recovery.mode=elastic: no data-parallel size from recovery.min_data_parallel="
            f"{r.min_data_parallel} to parallel.data={data} is a valid layout, so the run could "
            f"never shrink ({why or 'the range is empty'}); use recovery.mode=restart, or a "
            "layout that stays valid with fewer data-parallel replicas"
        )


def elastic_spec(cfg: "RunConfig") -> ElasticSpec | None:
    """What the backend needs to resize the run (None with ``recovery.mode: restart``)."""
    if cfg.recovery.mode != "elastic":
        return None
    p = cfg.parallel
    return ElasticSpec(
        ranks_per_replica=p.tensor * p.pipeline * p.context,
        replica_counts=tuple(elastic_sizes(cfg)[0]),
        wait_for_capacity_s=cfg.recovery.wait_for_capacity_s,
        grow_back=cfg.recovery.grow_back,
    )


def attempt_config(cfg: "RunConfig") -> "RunConfig":
    """On a rank: the config of this attempt. The backend of an elastic run sets the attempt's
    data-parallel size in the environment (cluster/elastic.py); it must be one of the sizes the
    config allows."""
    given = os.environ.get(DATA_PARALLEL_ENV)
    if given is None or int(given) == cfg.parallel.data:
        return cfg
    sizes = elastic_sizes(cfg)[0] if cfg.recovery.mode == "elastic" else [cfg.parallel.data]
    if int(given) not in sizes:
        raise ValueError(
            f"{DATA_PARALLEL_ENV}={given} is not a data-parallel size this run allows: {sizes}"
        )
    return with_data_parallel(cfg, int(given))
