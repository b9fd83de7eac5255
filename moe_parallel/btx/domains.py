"""The plan's domains as prepared data: one tokenizer for all, one .bin/.idx prefix per domain.

The tokenizer is trained once on every domain's text (each within its own ``max_bytes``): the
branches become experts of one model, so they must share a vocabulary. Each domain is then
tokenized with it on its own, so that its validation split is a held-out set of that domain
alone. Both are cached on disk (written atomically, under a lock), so preparing twice, or from
two processes, is safe and cheap.
"""

from __future__ import annotations

import hashlib
import itertools
import os
from dataclasses import dataclass
from pathlib import Path

from ..config.schema import DataConfig
from ..data import cache_root, corpus_fingerprint, iter_documents, prepare, train_tokenizer
from ..data.prepare import exclusive_lock
from .plan import BtxPlan


@dataclass(frozen=True)
class PreparedDomains:
    tokenizer: str
    prefixes: dict[str, str]  # domain -> Megatron prefix
    tokens: dict[str, int]

    @property
    def all_prefixes(self) -> list[str]:
        return list(self.prefixes.values())


def prepare_domains(plan: BtxPlan) -> PreparedDomains:
    tokenizer = shared_tokenizer(plan)
    prefixes, tokens = {}, {}
    for name, domain in plan.domains.items():
        prepared = prepare(
            DataConfig(
                sources=domain.sources,
                max_bytes=domain.max_bytes,
                tokenizer=tokenizer,
                cache_dir=plan.cache_dir,
                split=plan.split,
            )
        )
        prefixes[name], tokens[name] = prepared.prefixes[0], prepared.num_tokens
    return PreparedDomains(tokenizer, prefixes, tokens)


def shared_tokenizer(plan: BtxPlan) -> str:
    """The plan's tokenizer, else the BPE trained on all domains (cached by their content and
    the vocab size)."""
    if plan.tokenizer is not None:
        return str(Path(plan.tokenizer).expanduser())
    parts = [f"vocab={plan.tokenizer_vocab_size}"] + [
        f"{name}={corpus_fingerprint(d.sources, d.max_bytes)}" for name, d in plan.domains.items()
    ]
    key = hashlib.sha256(";".join(parts).encode()).hexdigest()[:16]
    root = cache_root(DataConfig(cache_dir=plan.cache_dir)) / "btx-tokenizers"
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{key}.json"
    with exclusive_lock(root / f"{key}.lock"):
        if not path.is_file():
            docs = itertools.chain.from_iterable(
                iter_documents(d.sources, d.max_bytes) for d in plan.domains.values()
            )
            tmp = root / f"{key}.tmp"
            train_tokenizer(docs, plan.tokenizer_vocab_size).save(str(tmp))
            os.replace(tmp, path)  # atomic: a reader never sees half a tokenizer
    return str(path)
