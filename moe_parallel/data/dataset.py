"""Train/valid/test GPT datasets over prepared data, built by Megatron-core's dataset builder.

A sample (``dataset[i]``) is a dict of 1-D tensors, all of length ``seq_length``:

* ``tokens``       int64: the input ids
* ``labels``       int64: the next-token targets, ``tokens`` shifted left by one (each sample reads
  ``seq_length + 1`` consecutive ids; samples run across document boundaries, EOD between them)
* ``loss_mask``    float32: 1.0, except 0.0 on padding (only in a padded last validation sample)
* ``position_ids`` int64: ``0 .. seq_length-1`` (positions are not reset at EOD)

There is no ``attention_mask``: the causal mask is implicit in the attention kernels. When the
data is a blend (several prefixes), Megatron's ``BlendedDataset`` adds ``dataset_id``, a NumPy
int16 scalar naming the prefix the sample came from.

Under ``torch.distributed`` the builder is a collective: every rank must call
``build_gpt_datasets`` (it runs barriers), global rank 0 must be among the ranks for which
``is_built_on_rank()`` is true (rank 0 computes and writes the index cache, then the others read
it), and ``cache_dir`` must be visible to all ranks (a shared filesystem), because ranks other than
0 never compute the indices themselves: on a cache miss they fail reading it. Ranks for which
``is_built_on_rank()`` is false get ``None`` for every split. Single-process use needs no setup.
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator, Optional
from unittest import mock

import numpy as np

from .prepare import PreparedData, document_lengths, exclusive_lock
from .tokenizer import Tokenizer

_SPLIT_NAMES = ("train", "valid", "test")


def build_gpt_datasets(
    prepared: PreparedData,
    split: str,
    seq_length: int,
    seed: int,
    num_samples: tuple[int, int, int],
    cache_dir: str,
    data_parallel_size: int = 1,
    is_built_on_rank: Optional[Callable[[], bool]] = None,
) -> tuple:
    """Return ``(train, valid, test)`` GPT datasets; a split whose share in ``split`` is 0 is None.

    ``num_samples`` is the number of samples wanted per split; a split smaller than that is
    repeated in reshuffled epochs. The shuffling depends only on ``seed`` and the data, and the
    index mappings are cached under ``cache_dir``, so every rank and every restart see the same
    sample order.
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    _check_splits_have_data(prepared, split, seq_length, num_samples)
    # One prefix with a weight would make Megatron wrap it in a pointless BlendedDataset.
    weights = prepared.weights if len(prepared.prefixes) > 1 else None
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=(list(prepared.prefixes), weights),
        split=split,
        path_to_cache=str(cache_dir),
        tokenizer=Tokenizer.from_file(prepared.tokenizer_path),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,  # the causal mask is implicit; a [1, s, s] mask is waste
        data_parallel_size=data_parallel_size,  # informational in Megatron-core 0.16
    )
    # A split asked for 0 samples still gets built by Megatron, which then loops forever looking
    # for 1 token in a split with no documents; None asks for "one epoch, whatever it holds".
    # (Megatron refuses None for blends; there _check_splits_have_data guards empty splits.)
    sizes = [n if n or weights else None for n in num_samples]
    builder = BlendedMegatronDatasetBuilder(
        GPTDataset, sizes, is_built_on_rank or (lambda: True), config
    )
    with _rank_zero_when_not_distributed(), _build_lock(cache_dir):
        return tuple(builder.build())


@contextlib.contextmanager
def _build_lock(cache_dir: str) -> Iterator[None]:
    """Serialize index building between jobs (or test runs) that share ``cache_dir``.

    Megatron writes its index files in place and trusts any complete-looking set, so two builders
    writing the same files at once could leave a mix. Only the process that writes takes the lock:
    rank 0, or the single process. Other ranks must not, since rank 0 waits for them at barriers.
    """
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_rank() != 0:
        yield
        return
    os.makedirs(cache_dir, exist_ok=True)
    with exclusive_lock(os.path.join(cache_dir, "build.lock")):
        yield


@contextlib.contextmanager
def _rank_zero_when_not_distributed() -> Iterator[None]:
    """Let Megatron's BlendedDataset run in a plain single process.

    ``BlendedDataset._build_indices`` calls ``torch.distributed.get_rank()`` without checking
    ``is_initialized()`` first (GPTDataset does check), which raises ValueError in a single
    process on a cache miss. A single process *is* rank 0, so answer 0 for the duration of the
    build; under torch.distributed nothing is patched.
    """
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    with mock.patch.object(dist, "get_rank", return_value=0):
        yield


def _check_splits_have_data(
    prepared: PreparedData, split: str, seq_length: int, num_samples: tuple[int, int, int]
) -> None:
    """Fail with a clear message where Megatron would loop forever or assert on an empty split.

    Megatron assigns whole documents to splits by rounding ``fraction * num_documents``; a split
    that gets no document (small corpus, small share) has zero tokens per epoch and GPTDataset
    would add epochs forever trying to reach ``num_samples``.
    """
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )

    if len(num_samples) != 3:
        raise ValueError(f"num_samples={num_samples!r}: expected (train, valid, test) counts")
    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    for prefix in prepared.prefixes:
        lengths = document_lengths(prefix)
        for name, bounds, wanted in zip(_SPLIT_NAMES, matrix, num_samples):
            # A blended split asked for 0 samples is still built (see build_gpt_datasets).
            if bounds is None or (not wanted and len(prepared.prefixes) == 1):
                continue
            # The same rounding as BlendedMegatronDatasetBuilder._build_megatron_dataset_splits.
            beg = int(round(bounds[0] * float(len(lengths))))
            end = int(round(bounds[1] * float(len(lengths))))
            tokens = int(np.sum(lengths[beg:end], dtype=np.int64))
            if tokens < (seq_length + 1 if wanted else 1):
                raise ValueError(
                    f"data split {split!r}: the {name} part of {prefix} is documents {beg}..{end} "
                    f"of {len(lengths)} with {tokens} tokens, fewer than seq_length + 1 = "
                    f"{seq_length + 1}; use more data or a larger {name} share in data.split"
                )
