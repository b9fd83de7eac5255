"""Reading a checkpoint's tensors in one process, whatever layout wrote it."""

from __future__ import annotations

from pathlib import Path

import torch


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint as its full global tensor, keyed by its global name
    (model tensors by parameter name, optimizer state as ``optimizer.<state>.<param name>``)."""
    from megatron.core import dist_checkpointing

    with _single_process_group():
        return dist_checkpointing.load_plain_tensors(str(path))


class _single_process_group:
    """Megatron's loader needs a default process group: a private one-rank gloo group."""

    def __enter__(self):
        self.created = not torch.distributed.is_initialized()
        if self.created:
            torch.distributed.init_process_group(
                "gloo", store=torch.distributed.HashStore(), rank=0, world_size=1
            )
        return self

    def __exit__(self, *exc):
        if self.created:
            torch.distributed.destroy_process_group()
        return False
