"""Held-out loss: the mean LM loss over the first batches of a dataset's validation split.

The validation split is Megatron's (``data.split``'s second share, whole documents, per prefix),
so documents evaluated here are never trained on by any run that uses the same prefixes and
split. Batches are taken in the split's fixed shuffled order (seeded), so two models evaluated
with the same prefixes, seed and batch count see exactly the same tokens: their losses compare.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state

from moe_parallel.model.build import TrainObjects

from ..config import RunConfig
from ..data import PreparedData, build_gpt_datasets
from ..data.prepare import cache_root
from .batches import StepBatches
from .step import evaluate_loss


class HeldOutSet:
    """The first ``num_batches`` global batches of ``prepared``'s validation split."""

    def __init__(
        self,
        cfg: RunConfig,
        prepared: PreparedData,
        num_batches: int,
        seed: int,
        device: torch.device,
    ):
        self.cfg, self.num_batches = cfg, num_batches
        wanted = num_batches * cfg.train.global_batch_size
        if cfg.finetune is not None:  # the held-out prompt/response examples (responses only)
            from moe_parallel.data.packing import finetune_datasets

            _, valid = finetune_datasets(cfg, prepared.tokenizer_path, 0, wanted)
        else:
            _, valid, _ = build_gpt_datasets(
                prepared,
                cfg.data.split,
                cfg.model.seq_length,
                seed,
                (0, wanted, 0),
                str(cache_root(cfg.data) / "index-cache"),
                data_parallel_size=cfg.parallel.data,
            )
        if valid is None:
            raise ValueError(
                f"data.split={cfg.data.split!r} has no validation share: held-out "
                "loss needs one (e.g. '98,2,0')"
            )
        self.batches = StepBatches(
            valid,
            cfg.train.global_batch_size,
            cfg.train.micro_batch_size,
            parallel_state.get_data_parallel_rank(),
            parallel_state.get_data_parallel_world_size(),
            device,
        )

    def loss(self, objs: TrainObjects) -> float:
        """Mean per-token loss over the batches (each batch weighs the same: full sequences)."""
        losses = [
            evaluate_loss(
                objs,
                self.batches.iterators(b, len(objs.model)),
                self.batches.num_microbatches,
                self.cfg.model.seq_length,
                self.cfg.train.micro_batch_size,
            )
            for b in range(self.num_batches)
        ]
        return sum(losses) / len(losses)
