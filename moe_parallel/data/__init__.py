"""Data: raw text corpus -> byte-level BPE tokenizer -> Megatron .bin/.idx -> GPT datasets.

``prepare(data_cfg)`` gives a ``PreparedData`` (cached on disk); ``build_gpt_datasets`` turns it
into Megatron-core train/valid/test ``GPTDataset``s. Megatron is imported inside the functions
that need it (importing it takes seconds), so importing this package stays cheap.
"""

from .corpus import corpus_fingerprint, iter_documents
from .dataset import build_gpt_datasets
from .prepare import PreparedData, cache_root, prepare
from .tokenizer import Tokenizer, train_tokenizer

__all__ = [
    "PreparedData",
    "Tokenizer",
    "build_gpt_datasets",
    "cache_root",
    "corpus_fingerprint",
    "iter_documents",
    "prepare",
    "train_tokenizer",
]
