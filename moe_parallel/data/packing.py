"""Instruction examples -> tokens -> packed fixed-length sequences with a response-only loss mask.

One example is ``prompt + response + EOD``, tokenized with the run's tokenizer (prompt and
response separately, so the boundary is exact). Its inputs are its tokens but the last, its
targets the tokens shifted left by one; a position counts in the loss (``loss_mask`` 1) when its
target is a response token or the closing EOD, so prompt tokens contribute exactly zero.

Packing: examples are placed first-fit, in a seeded shuffled order, into rows of ``seq_length``
positions (several examples per row); the rest of a row is padding (loss 0). Each example of a
row has its own segment id (1, 2, ...; 0 = padding) and position ids restarting at 0. With
``finetune.attention: per_example`` a sample carries a block-diagonal causal ``attention_mask``
([1, S, S] bool, True = masked, Megatron's convention) built from the segment ids, so attention
never crosses examples; otherwise the usual causal mask applies over the whole row. An example
longer than a row is cut to ``seq_length`` positions (its prompt kept from the end, so the
response stays), and counted in ``meta.json``.

The packed splits are cached under ``<data cache>/finetune/<key>/`` (the key hashes the sources,
the tokenizer, the sequence length, the split and the seed), written under a temporary name and
renamed into place under a lock, like the pretraining data.

Shapes: N packed rows, S sequence length.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from moe_parallel.config import RunConfig
from moe_parallel.data.instructions import Example, is_held_out, iter_examples, sources_fingerprint
from moe_parallel.data.prepare import PreparedData, cache_root, exclusive_lock, prepare
from moe_parallel.data.tokenizer import Tokenizer

PACK_FORMAT = 1
_SPLITS = ("train", "valid")
_ARRAYS = ("tokens_NS", "labels_NS", "loss_mask_NS", "position_ids_NS", "segment_ids_NS")


@dataclass
class PackedSplit:
    tokens_NS: np.ndarray  # int32
    labels_NS: np.ndarray  # int32
    loss_mask_NS: np.ndarray  # uint8
    position_ids_NS: np.ndarray  # int32
    segment_ids_NS: np.ndarray  # int16/int32: 0 = padding, 1.. = examples of the row

    def __len__(self) -> int:
        return self.tokens_NS.shape[0]


def tokenizer_only(cfg: RunConfig) -> PreparedData:
    """The run's tokenizer, all a finetune needs of ``data``: ``data.tokenizer`` when set (no
    pretraining data is read), else the one prepared from ``data.sources`` (cached by the base
    model's pretraining run, so usually not rebuilt)."""
    if cfg.data.tokenizer is None:
        return prepare(cfg.data)
    path = str(Path(cfg.data.tokenizer).expanduser())
    return PreparedData(
        prefixes=[],
        weights=None,
        tokenizer_path=path,
        vocab_size=Tokenizer.from_file(path).vocab_size,
        num_tokens=0,
        num_documents=0,
    )


def packed_dir(cfg: RunConfig, tokenizer_path: str) -> Path:
    """Pack the finetune sources (or reuse the cache); returns the directory of the splits."""
    ft = cfg.finetune
    tokenizer = Tokenizer.from_file(tokenizer_path)
    parts = [
        f"pack-format={PACK_FORMAT}",
        f"sources={sources_fingerprint(ft.sources)}",
        f"max_examples={ft.max_examples}",
        f"valid={ft.valid_fraction}",
        f"seq={cfg.model.seq_length}",
        f"seed={cfg.train.seed}",
        f"tokenizer={tokenizer.sha256}",
    ]
    key = hashlib.sha256(";".join(parts).encode()).hexdigest()[:16]
    parent = cache_root(cfg.data) / "finetune"
    final = parent / key
    if not (final / "meta.json").is_file():
        parent.mkdir(parents=True, exist_ok=True)
        with exclusive_lock(parent / f"{key}.lock"):
            if not (final / "meta.json").is_file():
                _build(cfg, tokenizer, parent, key)
    return final


def load_split(directory: Path, split: str) -> PackedSplit:
    with np.load(directory / f"{split}.npz") as f:
        return PackedSplit(*(f[name] for name in _ARRAYS))


def _build(cfg: RunConfig, tokenizer: Tokenizer, parent: Path, key: str) -> None:
    t0 = time.monotonic()
    ft = cfg.finetune
    for stale in parent.glob(f"{key}.tmp-*"):
        shutil.rmtree(stale)
    tmp = Path(tempfile.mkdtemp(prefix=f"{key}.tmp-", dir=parent))
    try:
        tmp.chmod(0o755)
        by_split: dict[str, list[Example]] = {"train": [], "valid": []}
        for source in ft.sources:
            for ex in iter_examples(source, ft.max_examples):
                by_split["valid" if is_held_out(ex, ft.valid_fraction) else "train"].append(ex)
        meta = {"sources": ft.sources, "seq_length": cfg.model.seq_length}
        for split in _SPLITS:
            examples = by_split[split]
            if split == "train" and not examples:
                raise ValueError(f"finetune.sources={ft.sources} hold no training examples")
            rng = random.Random(f"{cfg.train.seed}:{split}")
            rng.shuffle(examples)  # mixes the sources within rows
            packed, counts = pack(
                tokenize(tokenizer, examples),
                cfg.model.seq_length,
                tokenizer.pad if tokenizer.pad >= 0 else tokenizer.eod,
            )
            np.savez(tmp / f"{split}.npz", **{n: getattr(packed, n) for n in _ARRAYS})
            meta[split] = counts
        meta["seconds"] = round(time.monotonic() - t0, 3)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        os.rename(tmp, parent / key)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(
        f"[moe_parallel.finetune] packed {meta['train']['examples']} training and "
        f"{meta['valid']['examples']} held-out examples into {meta['train']['rows']} + "
        f"{meta['valid']['rows']} rows of {cfg.model.seq_length} in {meta['seconds']:.1f}s "
        f"-> {parent / key}",
        file=sys.stderr,
        flush=True,
    )


def tokenize(tokenizer: Tokenizer, examples: list[Example]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids + EOD) per example."""
    prompts = tokenizer.encode_batch([e.prompt for e in examples]) if examples else []
    responses = tokenizer.encode_batch([e.response for e in examples]) if examples else []
    return [(p, r + [tokenizer.eod]) for p, r in zip(prompts, responses)]


def pack(
    examples: list[tuple[list[int], list[int]]], seq_length: int, pad: int
) -> tuple[PackedSplit, dict]:
    """First-fit packing of (prompt ids, response ids) into rows of ``seq_length`` positions."""
    rows: list[list[tuple[list[int], int]]] = []  # per row: (ids, prompt length) of examples
    free: list[int] = []
    cut = 0
    for prompt, response in examples:
        if not response:
            continue
        ids, n_prompt = prompt + response, len(prompt)
        if len(ids) - 1 > seq_length:  # keep the response (up to a row) and the prompt's end
            cut += 1
            keep = seq_length + 1
            n_prompt = max(0, keep - len(response))
            ids = (
                prompt[len(prompt) - n_prompt :] + response[: keep - n_prompt]
                if n_prompt
                else response[:keep]
            )
        positions = len(ids) - 1
        if positions < 1:
            continue
        for i, space in enumerate(free):
            if space >= positions:
                rows[i].append((ids, n_prompt))
                free[i] -= positions
                break
        else:
            rows.append([(ids, n_prompt)])
            free.append(seq_length - positions)
    n = len(rows)
    out = PackedSplit(
        tokens_NS=np.full((n, seq_length), pad, dtype=np.int32),
        labels_NS=np.full((n, seq_length), pad, dtype=np.int32),
        loss_mask_NS=np.zeros((n, seq_length), dtype=np.uint8),
        position_ids_NS=np.zeros((n, seq_length), dtype=np.int32),
        segment_ids_NS=np.zeros((n, seq_length), dtype=np.int32),
    )
    loss_tokens = 0
    for r, row in enumerate(rows):
        at = 0
        for segment, (ids, n_prompt) in enumerate(row, start=1):
            length = len(ids) - 1
            span = slice(at, at + length)
            out.tokens_NS[r, span] = ids[:-1]
            out.labels_NS[r, span] = ids[1:]
            # Target j is ids[j + 1]: a response token (or the EOD) from j = n_prompt - 1 on.
            out.loss_mask_NS[r, at + max(n_prompt - 1, 0) : at + length] = 1
            out.position_ids_NS[r, span] = np.arange(length)
            out.segment_ids_NS[r, span] = segment
            at += length
        # Padding: positions continue (any value works, loss 0), its own segment 0.
        out.position_ids_NS[r, at:] = np.arange(seq_length - at)
    loss_tokens = int(out.loss_mask_NS.sum())
    counts = {
        "examples": sum(len(row) for row in rows),
        "rows": n,
        "cut_to_fit": cut,
        "response_tokens": loss_tokens,
        "fill": round(float((out.segment_ids_NS > 0).mean()) if n else 0.0, 4),
    }
    return out, counts


class PackedInstructions:
    """A ``Sequence[dict]`` of samples (the keys of the GPT datasets, plus ``attention_mask`` for
    per-example attention), ``num_samples`` long: epochs over the rows, each in its own seeded
    order, so any sample count can be asked for and index ``i`` is always the same sample."""

    def __init__(
        self,
        split: PackedSplit,
        num_samples: int,
        seed: int,
        per_example: bool,
        shuffle: bool = True,
    ):
        if len(split) == 0:
            raise ValueError(
                "the packed instruction split is empty: use more examples or a "
                "larger finetune.valid_fraction"
            )
        self.split, self.num_samples, self.seed = split, num_samples, seed
        self.per_example, self.shuffle = per_example, shuffle
        self._orders: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.num_samples

    def row(self, index: int) -> int:
        n = len(self.split)
        epoch, offset = divmod(index, n)
        if not self.shuffle:
            return offset
        if epoch not in self._orders:
            self._orders[epoch] = np.random.default_rng([self.seed, epoch]).permutation(n)
        return int(self._orders[epoch][offset])

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_samples:
            raise IndexError(index)
        r, s = self.row(index), self.split
        sample = {
            "tokens": torch.from_numpy(s.tokens_NS[r].astype(np.int64)),
            "labels": torch.from_numpy(s.labels_NS[r].astype(np.int64)),
            "loss_mask": torch.from_numpy(s.loss_mask_NS[r].astype(np.float32)),
            "position_ids": torch.from_numpy(s.position_ids_NS[r].astype(np.int64)),
        }
        if self.per_example:
            sample["attention_mask"] = block_causal_mask(torch.from_numpy(s.segment_ids_NS[r]))
        return sample


def block_causal_mask(segment_ids_S: torch.Tensor) -> torch.Tensor:
    """[1, S, S] bool, True where query i may NOT attend key j: j > i or another segment.

    Padding (segment 0) attends only to itself causally (its loss is 0 anyway)."""
    same = segment_ids_S.unsqueeze(0) == segment_ids_S.unsqueeze(1)
    causal = torch.ones(segment_ids_S.numel(), segment_ids_S.numel(), dtype=torch.bool).tril()
    return (~(same & causal)).unsqueeze(0)


def finetune_datasets(cfg: RunConfig, tokenizer_path: str, num_train: int, num_valid: int) -> tuple:
    """(train, valid) datasets of ``num_train`` / ``num_valid`` samples (None when 0)."""
    directory = packed_dir(cfg, tokenizer_path)
    per_example = cfg.finetune.attention == "per_example"
    train = valid = None
    if num_train:
        train = PackedInstructions(
            load_split(directory, "train"), num_train, cfg.train.seed, per_example
        )
    if num_valid:
        # Held-out rows in their stored order: every evaluation sees the same tokens.
        valid = PackedInstructions(
            load_split(directory, "valid"), num_valid, cfg.train.seed, per_example, shuffle=False
        )
    return train, valid
