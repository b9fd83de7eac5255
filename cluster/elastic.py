"""Elastic runs: a run that loses capacity goes on with fewer data-parallel replicas, and grows
back to its configured size at a checkpoint once the capacity returns.

This layer knows a run as ``replicas x ranks_per_replica`` ranks and nothing about models: which
replica counts a run may take (the data-parallel sizes that keep its model-parallel shape and
its global batch) is decided above it, by the planner (``moe_parallel/plan/elastic.py``), and
handed over in :class:`ElasticSpec`. Every backend uses the same pieces:

* :meth:`ElasticSpec.largest_that_fits`: the replica count an attempt takes for the ranks the
  cluster can place now;
* :func:`elastic_env`: what tells the ranks their data-parallel size (:data:`DATA_PARALLEL_ENV`);
* :func:`request_grow_back` / :func:`grow_back_requested`: the backend asks the ranks to stop
  at their next checkpoint (they exit with ``EXIT_REQUEUE``) so that it can restart them at a
  larger size;
* :func:`record_resize`: every change of size goes to ``state.json`` (``resizes``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from cluster import registry
from cluster.env import DATA_PARALLEL_ENV
from cluster.registry import Resize, RunRecord

# RUN_DIR/grow_back.request: the backend asks the ranks to stop after their next checkpoint.
GROW_BACK_REQUEST = "grow_back.request"

SHRINK = "elastic_shrink"
GROW = "elastic_grow"


@dataclass(frozen=True)
class ElasticSpec:
    """How a run may change size. ``replica_counts``: the data-parallel sizes it may run at,
    largest first; the first is the configured one. ``ranks_per_replica``: the model-parallel
    group (tensor x pipeline x context), which never changes."""

    ranks_per_replica: int
    replica_counts: tuple[int, ...]
    wait_for_capacity_s: float
    grow_back: bool = True

    def __post_init__(self) -> None:
        counts = tuple(int(c) for c in self.replica_counts)
        object.__setattr__(self, "replica_counts", counts)
        if self.ranks_per_replica < 1:
            raise ValueError(f"ranks_per_replica must be >= 1, got {self.ranks_per_replica}")
        if not counts or list(counts) != sorted(set(counts), reverse=True) or counts[-1] < 1:
            raise ValueError(
                f"replica_counts must be distinct positive counts, largest first; got {counts}"
            )
        if self.wait_for_capacity_s < 0:
            raise ValueError(f"wait_for_capacity_s must be >= 0, got {self.wait_for_capacity_s}")

    @property
    def full(self) -> int:
        """The configured replica count."""
        return self.replica_counts[0]

    def world(self, replicas: int) -> int:
        return replicas * self.ranks_per_replica

    def largest_that_fits(self, ranks: int) -> int | None:
        """The largest allowed replica count whose ranks fit in ``ranks``; None if none does."""
        return next((c for c in self.replica_counts if self.world(c) <= ranks), None)

    def to_dict(self) -> dict:
        return {**asdict(self), "replica_counts": list(self.replica_counts)}

    @classmethod
    def from_dict(cls, data: dict | None) -> ElasticSpec | None:
        return None if data is None else cls(**data)


def elastic_env(replicas: int) -> dict[str, str]:
    """The environment that gives every rank of an attempt its data-parallel size."""
    return {DATA_PARALLEL_ENV: str(int(replicas))}


def request_grow_back(run_dir: Path, replicas: int) -> None:
    """Ask the ranks to stop after their next checkpoint, to restart with ``replicas``."""
    (Path(run_dir) / GROW_BACK_REQUEST).write_text(f"{int(replicas)}\n")


def grow_back_requested(run_dir: Path) -> bool:
    return (Path(run_dir) / GROW_BACK_REQUEST).is_file()


def clear_grow_back(run_dir: Path) -> None:
    (Path(run_dir) / GROW_BACK_REQUEST).unlink(missing_ok=True)


def record_resize(
    run_dir: Path,
    spec: ElasticSpec,
    old: int,
    new: int,
    cause: str,
    attempt: str,
    step: int | None,
    record: RunRecord | None = None,
) -> Resize:
    """Append the change from ``old`` to ``new`` replicas to ``state.json``'s ``resizes`` (to
    ``record``, and write it whole, when the caller holds the run's record in memory)."""
    resize = Resize(
        at=registry.now_iso(),
        kind=SHRINK if new < old else GROW,
        step=step,
        attempt=attempt,
        from_data_parallel=old,
        to_data_parallel=new,
        from_world_size=spec.world(old),
        to_world_size=spec.world(new),
        cause=cause,
    )
    if record is not None:
        record.resizes.append(resize)
        registry.write_record(run_dir, record)
    else:
        registry.update_record(run_dir, lambda current: current.resizes.append(resize))
    return resize
