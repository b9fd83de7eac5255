"""Micro-batches of a global step for this data-parallel rank, by sample index.

Global step s covers samples [s * G, (s + 1) * G) of the training dataset (G = global batch).
Micro-batch m of data-parallel rank r holds samples s * G + (m * D + r) * B + [0, B), with D the
data-parallel size and B the micro-batch size, which is how Megatron's pretraining sampler
orders them. Every layout therefore sees the same micro-batches, and the data position of a
run is just the step: resuming at step s needs no iterator state and works under any DP size.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch

_KEYS = ("tokens", "labels", "loss_mask", "position_ids")
_OPTIONAL_KEYS = ("attention_mask",)  # per-example attention of packed finetuning data


class StepBatches:
    def __init__(
        self,
        dataset: Sequence[dict],
        global_batch_size: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        device: torch.device,
    ):
        self.dataset = dataset
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.device = device

    @property
    def num_microbatches(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.dp_size)

    def sample_ids(self, step: int, micro: int) -> range:
        start = (
            step * self.global_batch_size
            + (micro * self.dp_size + self.dp_rank) * self.micro_batch_size
        )
        return range(start, start + self.micro_batch_size)

    def micro_batches(self, step: int) -> Iterator[dict]:
        for micro in range(self.num_microbatches):
            ids = self.sample_ids(step, micro)
            batch = self._collate([self.dataset[i] for i in ids])
            # Global sample indices: stochastic routers key their draws on them (routers/noise.py)
            batch["sample_ids"] = torch.arange(ids.start, ids.stop, dtype=torch.int64)
            yield batch

    def iterators(self, step: int, num_chunks: int) -> list[Iterator[dict]]:
        """One iterator per model chunk: interleaved pipelining pulls each chunk separately."""
        return [self.micro_batches(step) for _ in range(num_chunks)]

    def _collate(self, samples: list[dict]) -> dict:
        batch = {}
        for key in _KEYS:
            values = [_as_tensor(s[key]) for s in samples]
            batch[key] = torch.stack(values).to(self.device, non_blocking=True)
        for key in _OPTIONAL_KEYS:
            if key in samples[0]:
                batch[key] = torch.stack([s[key] for s in samples]).to(self.device)
        return batch


def _as_tensor(value) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    return value
