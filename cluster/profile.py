"""Cluster profiles: where and how a run's ranks are placed (a YAML under ``configs/clusters/``).

A profile says which backend to use and, for SLURM, the sbatch side of the job: partition,
account, QoS, nodes, GPUs, time limit, and setup lines. Command-line overrides use the same
dotted form as run configs (``slurm.nodes=2``). Everything here is checked before submission.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cluster.typed_yaml import read_yaml_mapping, validate


class ProfileError(ValueError):
    """A cluster profile (or an override of it) that cannot be submitted."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# SLURM's accepted --time formats (sbatch(1)).
_TIME_FORMATS = ("MM", "MM:SS", "HH:MM:SS", "D-HH", "D-HH:MM", "D-HH:MM:SS")
_TIME_RE = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


def time_limit_seconds(text: str) -> int:
    """SLURM's time limit formats to seconds; raises ValueError naming the allowed formats."""
    match = _TIME_RE.match(str(text).strip())
    if not match:
        raise ValueError(
            f"time limit {text!r} is not a SLURM time: allowed formats are "
            f"{', '.join(_TIME_FORMATS)}"
        )
    days, a, b, c = match.groups()
    if days is not None:  # D-HH[:MM[:SS]]
        seconds = int(days) * 86400 + int(a) * 3600 + int(b or 0) * 60 + int(c or 0)
    elif c is not None:  # HH:MM:SS
        seconds = int(a) * 3600 + int(b) * 60 + int(c)
    elif b is not None:  # MM:SS
        seconds = int(a) * 60 + int(b)
    else:  # MM
        seconds = int(a) * 60
    if seconds <= 0:
        raise ValueError(f"time limit {text!r} must be longer than zero")
    return seconds


class SlurmProfile(_Strict):
    partition: str | None = Field(None, description="None: the cluster's default partition")
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    nodes: int = Field(1, ge=1, description="nodes the ranks run on")
    spare_nodes: int = Field(
        0,
        ge=0,
        description="idle nodes allocated besides `nodes`: a lost node is replaced by one of "
        "them at once, in the allocation, at the full size",
    )
    ranks_per_node: int | None = Field(None, ge=1, description="None: world size / nodes")
    gpus_per_node: int = Field(0, ge=0, description="0: CPU ranks")
    cpus_per_rank: int = Field(1, ge=1)
    mem: str | None = Field(None, description="per node, as sbatch --mem (e.g. 64G)")
    time: str = Field("01:00:00", description="time limit in a SLURM format")
    exclusive: bool = False
    signal_delay_s: int = Field(120, ge=1, description="SIGUSR2 this long before the time limit")
    max_restarts: int = Field(3, ge=0, description="failures resubmitted before giving up")
    job_name: str | None = None
    sbatch: dict[str, str | int | bool] = Field(
        default_factory=dict, description="extra #SBATCH options"
    )
    setup: list[str] = Field(default_factory=list, description="shell lines before the ranks start")
    python: str | None = Field(
        None, description="interpreter on the compute nodes (default: this one)"
    )

    @field_validator("time", mode="before")
    @classmethod
    def _time(cls, value: object) -> str:
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)  # YAML reads `time: 30` as a number: SLURM's minutes
        if isinstance(value, str):
            time_limit_seconds(value)
        return value

    @property
    def time_limit_s(self) -> int:
        return time_limit_seconds(self.time)

    @model_validator(mode="after")
    def _signal_before_limit(self) -> "SlurmProfile":
        if self.signal_delay_s >= self.time_limit_s:
            raise ValueError(
                f"signal_delay_s={self.signal_delay_s} must be shorter than the time "
                f"limit ({self.time} = {self.time_limit_s} s)"
            )
        return self

    def ranks_on_each_node(self, world_size: int) -> int:
        """Ranks per node for a run of ``world_size`` ranks; raises ProfileError if they do not fit."""
        per_node = self.ranks_per_node or world_size // self.nodes
        if per_node * self.nodes != world_size:
            placed = (
                f"{self.nodes} node(s) x {self.ranks_per_node} ranks per node"
                if self.ranks_per_node
                else f"{self.nodes} node(s) cannot hold them evenly"
            )
            raise ProfileError(
                f"the run needs {world_size} ranks but {placed}: choose slurm.nodes dividing "
                f"{world_size} (and slurm.ranks_per_node = {world_size} / nodes, or unset)"
            )
        if self.gpus_per_node and per_node > self.gpus_per_node:
            raise ProfileError(
                f"{per_node} ranks per node but slurm.gpus_per_node="
                f"{self.gpus_per_node}: one GPU per rank is required"
            )
        return per_node


class RayProfile(_Strict):
    address: str | None = Field(
        None,
        description="the Jobs API (dashboard) address, "
        "http://HEAD:8265; None: $RAY_ADDRESS when it is an http address, "
        "else http://127.0.0.1:8265",
    )
    cpus_per_rank: float = Field(1.0, gt=0)
    gpus_per_rank: int = Field(0, ge=0, le=1, description="0: CPU ranks (gloo); 1: one GPU each")
    strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="placement group strategy: PACK = as few nodes as possible"
    )
    max_restarts: int = Field(3, ge=0, description="failures restarted before giving up")
    placement_timeout_s: float = Field(120.0, gt=0, description="wait for capacity this long")
    env: dict[str, str] = Field(default_factory=dict, description="extra environment of the ranks")

    def resolved_address(self) -> str:
        import os

        if self.address:
            return self.address
        from_env = os.environ.get("RAY_ADDRESS", "")  # may also be a GCS host:port (ray.init's)
        return from_env if from_env.startswith(("http://", "https://")) else "http://127.0.0.1:8265"

    def bundle(self) -> dict[str, float]:
        """What one rank reserves in the placement group."""
        out = {"CPU": self.cpus_per_rank}
        if self.gpus_per_rank:
            out["GPU"] = float(self.gpus_per_rank)
        return out


# Llama 3's checkpoint storage (Dubey et al. 2024, "The Llama 3 Herd of Models", section 3.3.1:
# Tectonic, 2 TB/s sustained) shared by its 16,384 GPUs in servers of 8: 2,048 nodes.
LLAMA3_STORAGE_GB_S_PER_NODE = 2000.0 / 2048


class StorageProfile(_Strict):
    """The checkpoint storage as one node sees it (the goodput simulator's save and load times)."""

    bandwidth_per_node_gb_s: float = Field(
        LLAMA3_STORAGE_GB_S_PER_NODE,
        gt=0,
        description="sustained checkpoint read/write GB/s (1e9 bytes) per node when every node "
        "reads or writes at once; default: Llama 3's 2 TB/s over its 2,048 nodes",
    )
    gpus_per_node: int = Field(8, ge=1, description="GPUs (ranks) sharing a node's bandwidth")


class ClusterProfile(_Strict):
    backend: Literal["local", "slurm", "ray"] = "slurm"
    slurm: SlurmProfile = Field(default_factory=SlurmProfile)
    ray: RayProfile = Field(default_factory=RayProfile)
    storage: StorageProfile = Field(default_factory=StorageProfile)


PROFILE_SECTIONS = tuple(ClusterProfile.model_fields)


def load_profile(path: str | Path | None, overrides: Iterable[str] = ()) -> ClusterProfile:
    """The profile at ``path`` (or the defaults when None) with dotted overrides applied."""
    raw = read_yaml_mapping(path, ProfileError) if path is not None else {}
    return validate(
        ClusterProfile,
        raw,
        overrides,
        str(path or "cluster profile"),
        ProfileError,
        what="cluster profile",
    )


def split_overrides(overrides: Iterable[str]) -> tuple[list[str], list[str]]:
    """(run config overrides, profile overrides): ``slurm.*`` and ``backend=`` go to the profile."""
    run, profile = [], []
    for item in overrides:
        head = item.partition("=")[0].split(".")[0].strip()
        (profile if head in PROFILE_SECTIONS else run).append(item)
    return run, profile
