"""Turn ``DataConfig`` into Megatron indexed datasets (.bin/.idx) plus a tokenizer, cached on disk.

Either the config names ready prefixes (validated and returned as they are), or its sources are
tokenized into ``<cache>/prepared/<key>/`` where the key hashes the corpus selection, the vocab size
and the tokenizer. A prepared directory only ever appears complete: it is written under a
temporary name and renamed into place, and an exclusive lock per key makes a concurrent second
preparer wait and then reuse the result instead of repeating the work.

The cache directory should be on storage that every node of a run can read (or be prepared on
each node): the training ranks mmap the .bin/.idx files directly.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from cluster.locks import exclusive_lock

from ..config.schema import DataConfig
from .corpus import corpus_fingerprint, iter_documents
from .tokenizer import Tokenizer, train_tokenizer

# Bump when the prepared layout or tokenization changes, so old cache entries are not reused.
PREPARE_FORMAT = 1
PREFIX_NAME = "data"  # prepared/<key>/data.bin + data.idx
TOKENIZER_NAME = "tokenizer.json"
META_NAME = "meta.json"  # written last: its presence marks a complete directory
_BATCH_DOCS = 64  # documents per encode_batch call: enough to keep all cores busy
_PROGRESS_EVERY_S = 5.0


@dataclass
class PreparedData:
    prefixes: list[str]  # Megatron path prefixes: <prefix>.bin and <prefix>.idx
    weights: Optional[list[float]]  # blend weights, one per prefix; None = by size
    tokenizer_path: str
    vocab_size: int
    num_tokens: int  # all prefixes together, EOD tokens included
    num_documents: int


def cache_root(data_cfg: DataConfig) -> Path:
    """``data.cache_dir``, else ``$MOE_PARALLEL_CACHE``, else ``~/.cache/moe-parallel``."""
    root = data_cfg.cache_dir or os.environ.get("MOE_PARALLEL_CACHE") or "~/.cache/moe-parallel"
    return Path(root).expanduser()


def prepare(data_cfg: DataConfig) -> PreparedData:
    """Return the datasets ``data_cfg`` describes, preparing and caching them if needed."""
    if data_cfg.prefixes is not None:
        return _use_given_prefixes(data_cfg)
    key = _cache_key(data_cfg)
    parent = cache_root(data_cfg) / "prepared"
    final = parent / key
    if not (final / META_NAME).is_file():
        parent.mkdir(parents=True, exist_ok=True)
        with exclusive_lock(parent / f"{key}.lock"):
            # Re-check under the lock: another process may have finished while we waited.
            if not (final / META_NAME).is_file():
                _build_atomically(data_cfg, parent, key)
    return _load_prepared(final)


def _use_given_prefixes(data_cfg: DataConfig) -> PreparedData:
    if data_cfg.tokenizer is None:
        raise ValueError(
            "data.prefixes is set but data.tokenizer is not: prepared .bin/.idx files need the "
            "tokenizer.json they were made with"
        )
    tokenizer = Tokenizer.from_file(str(Path(data_cfg.tokenizer).expanduser()))
    prefixes, num_tokens, num_documents = [], 0, 0
    for i, prefix in enumerate(data_cfg.prefixes):
        prefix = str(Path(prefix).expanduser())
        for suffix in (".bin", ".idx"):
            if not Path(prefix + suffix).is_file():
                raise FileNotFoundError(f"data.prefixes[{i}]: {prefix + suffix} does not exist")
        lengths = document_lengths(prefix)
        num_tokens += int(lengths.sum(dtype=np.int64))
        num_documents += len(lengths)
        prefixes.append(prefix)
    return PreparedData(
        prefixes=prefixes,
        weights=data_cfg.blend_weights,
        tokenizer_path=str(Path(data_cfg.tokenizer).expanduser()),
        vocab_size=tokenizer.vocab_size,
        num_tokens=num_tokens,
        num_documents=num_documents,
    )


def document_lengths(prefix: str) -> np.ndarray:
    """The token count of every document of a prepared prefix (a copy, safe to keep)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix)
    # A copy: the array is a view of an mmap that IndexedDataset.__del__ unmaps, and touching
    # it after the dataset is garbage-collected is a segfault, not an exception.
    lengths = np.array(dataset.sequence_lengths, dtype=np.int64)
    del dataset
    return lengths


def _cache_key(data_cfg: DataConfig) -> str:
    tokenizer_id = "train"
    if data_cfg.tokenizer is not None:
        # The content, not only the path: retraining a tokenizer in place must invalidate.
        tokenizer_id = Tokenizer.from_file(str(Path(data_cfg.tokenizer).expanduser())).sha256
    parts = [
        f"prepare-format={PREPARE_FORMAT}",
        f"corpus={corpus_fingerprint(data_cfg.sources, data_cfg.max_bytes)}",
        f"vocab={data_cfg.tokenizer_vocab_size}",
        f"tokenizer={tokenizer_id}",
    ]
    digest = hashlib.sha256(";".join(parts).encode()).hexdigest()[:16]
    # A readable hint in the directory name; the digest alone decides.
    return f"{digest}-v{data_cfg.tokenizer_vocab_size}" if data_cfg.tokenizer is None else digest


def _build_atomically(data_cfg: DataConfig, parent: Path, key: str) -> None:
    # Holding the lock, any temp dir of this key is left over from a crashed preparer.
    for stale in parent.glob(f"{key}.tmp-*"):
        shutil.rmtree(stale)
    tmp = Path(tempfile.mkdtemp(prefix=f"{key}.tmp-", dir=parent))
    try:
        # mkdtemp makes it 0700; the cache may be shared by the users of a cluster.
        tmp.chmod(0o755)
        _build(data_cfg, tmp, parent / key)
        _fsync_files(tmp)
        publish(tmp, parent / key)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync_files(directory: Path) -> None:
    """Flush the files to disk before the rename, so a power loss cannot publish empty files."""
    for path in directory.iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def publish(tmp: Path, final: Path) -> None:
    """Rename the finished directory into place; atomic, so readers never see it half-written."""
    try:
        os.rename(tmp, final)
    except OSError:
        # A preparer the lock did not exclude (another node) got there first: use its result.
        if not (final / META_NAME).is_file():
            raise
        shutil.rmtree(tmp)


def _build(data_cfg: DataConfig, out: Path, final: Path) -> None:
    t0 = time.monotonic()
    if data_cfg.tokenizer is not None:
        tokenizer = Tokenizer.from_file(str(Path(data_cfg.tokenizer).expanduser()))
    else:
        # Documents are read twice (train, then encode) rather than held in memory.
        docs = iter_documents(data_cfg.sources, data_cfg.max_bytes)
        tokenizer = train_tokenizer(docs, data_cfg.tokenizer_vocab_size)
        _log(f"trained a {tokenizer.vocab_size}-token BPE in {time.monotonic() - t0:.1f}s")
    # A copy inside the prepared dir keeps it self-contained and matched to its tokens.
    tokenizer.save(str(out / TOKENIZER_NAME))
    counts = _write_indexed(data_cfg, tokenizer, str(out / PREFIX_NAME))
    meta = {
        "vocab_size": tokenizer.vocab_size,
        "sources": data_cfg.sources,
        "max_bytes": data_cfg.max_bytes,
        "seconds": round(time.monotonic() - t0, 3),
        **counts,
    }
    (out / META_NAME).write_text(json.dumps(meta, indent=2) + "\n")
    _log(
        f"prepared {counts['num_documents']} documents, {counts['num_tokens']} tokens "
        f"in {meta['seconds']:.1f}s -> {final}"
    )


def _write_indexed(data_cfg: DataConfig, tokenizer: Tokenizer, prefix: str) -> dict:
    import torch
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    # Megatron's own rule (what its preprocess_data uses): uint16 below 65500 ids, else int32.
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    progress = _Progress()
    batch: list[str] = []

    def flush() -> None:
        tokens = 0
        for ids in tokenizer.encode_batch(batch):
            ids.append(tokenizer.eod)  # EOD ends every document, so samples can span documents
            builder.add_item(torch.from_numpy(np.asarray(ids, dtype=dtype)))
            builder.end_document()
            tokens += len(ids)
        progress.add(len(batch), tokens, sum(len(d.encode("utf-8")) for d in batch))
        batch.clear()

    for doc in iter_documents(data_cfg.sources, data_cfg.max_bytes):
        batch.append(doc)
        if len(batch) >= _BATCH_DOCS:
            flush()
    if batch:
        flush()
    if progress.docs == 0:
        raise ValueError(f"data.sources={data_cfg.sources} contain no text to prepare")
    builder.finalize(prefix + ".idx")
    return {"num_documents": progress.docs, "num_tokens": progress.tokens, "bytes": progress.nbytes}


class _Progress:
    """Counts what was written and reports it on stderr every few seconds."""

    def __init__(self) -> None:
        self.docs = self.tokens = self.nbytes = 0
        self.start = self.last = time.monotonic()

    def add(self, docs: int, tokens: int, nbytes: int) -> None:
        self.docs += docs
        self.tokens += tokens
        self.nbytes += nbytes
        now = time.monotonic()
        if now - self.last >= _PROGRESS_EVERY_S:
            self.last = now
            rate = self.tokens / max(now - self.start, 1e-9)
            _log(
                f"tokenized {self.docs} documents, {self.nbytes / 1e6:.1f} MB, "
                f"{self.tokens} tokens ({rate:,.0f} tokens/s)"
            )


def _load_prepared(directory: Path) -> PreparedData:
    meta = json.loads((directory / META_NAME).read_text())
    return PreparedData(
        prefixes=[str(directory / PREFIX_NAME)],
        weights=None,
        tokenizer_path=str(directory / TOKENIZER_NAME),
        vocab_size=meta["vocab_size"],
        num_tokens=meta["num_tokens"],
        num_documents=meta["num_documents"],
    )


def _log(message: str) -> None:
    print(f"[moe_parallel.data] {message}", file=sys.stderr, flush=True)


__all__ = ["PreparedData", "cache_root", "document_lengths", "exclusive_lock", "prepare"]
