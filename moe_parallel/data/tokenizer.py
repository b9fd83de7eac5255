"""A byte-level BPE tokenizer (HF ``tokenizers``), trained on the corpus or loaded from a file.

``Tokenizer`` is what both our data preparation and Megatron-core's ``GPTDataset`` use: the dataset
reads ``eod``, ``pad``, ``vocab_size`` and ``unique_identifiers`` (the latter goes into the hash of
its index cache, so it holds a hash of the tokenizer's content, not its path).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable, Optional

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

EOD_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
# Special tokens come first, so EOD is id 0 and PAD id 1 in every tokenizer we train.
SPECIAL_TOKENS = [EOD_TOKEN, PAD_TOKEN]
NO_PAD = -1
# 256 byte symbols + the special tokens: below this there is no room for a single merge.
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS) + 1


class Tokenizer:
    """Byte-level BPE with an end-of-document token; picklable (as its JSON, not its path).

    Megatron-core's GPTDataset needs ``eod`` (document separator, also the mask/position reset
    marker), ``pad`` (for padded samples; it must differ from ``eod`` or Megatron warns and falls
    back to -1), ``vocab_size`` (picks the on-disk dtype) and ``unique_identifiers``.
    """

    def __init__(self, hf_tokenizer: HFTokenizer, path: Optional[str] = None) -> None:
        self._tok = hf_tokenizer
        # Text that happens to contain "<|endoftext|>" must not turn into a real EOD token: treat
        # special tokens as plain text when encoding. EOD is only ever added explicitly.
        self._tok.encode_special_tokens = True
        self.path = path
        self.eod = self._special_id(EOD_TOKEN)
        pad = self._tok.token_to_id(PAD_TOKEN)
        # Tokenizers from elsewhere (e.g. GPT-2's) have no pad token: -1 is Megatron's own
        # sentinel for that case (padded positions get loss 0 and are fed as id 0).
        self.pad = NO_PAD if pad is None else pad
        content = hf_tokenizer.to_str().encode("utf-8")
        self.sha256 = hashlib.sha256(content).hexdigest()

    @classmethod
    def from_file(cls, path: str) -> "Tokenizer":
        if not Path(path).is_file():
            raise FileNotFoundError(f"tokenizer file {path!r} does not exist")
        try:
            hf = HFTokenizer.from_file(str(path))
        except Exception as err:  # the Rust side raises a bare Exception on malformed JSON
            raise ValueError(f"tokenizer file {path!r} could not be loaded: {err}") from err
        return cls(hf, str(path))

    def __getstate__(self) -> dict:
        # Pickle the JSON itself, not the path: DataLoader workers and other nodes may not see it.
        return {"json": self._tok.to_str(), "path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(HFTokenizer.from_str(state["json"]), state["path"])

    @property
    def vocab_size(self) -> int:
        """The number of ids (the trainer stops early when the corpus has too few merges)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eos(self) -> int:
        return self.eod

    @property
    def unique_identifiers(self) -> dict:
        return {"class": "moe_parallel.Tokenizer", "sha256": self.sha256}

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many texts at once; the Rust side spreads them over all cores."""
        # encode_batch_fast (tokenizers >= 0.20) skips the character offsets we never use, about
        # a quarter of the work.
        encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        return [e.ids for e in encode(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        # Keep special tokens so a decoded training sample shows its document boundaries.
        return self._tok.decode(list(ids), skip_special_tokens=False)

    # Names Megatron's text-generation helpers call.
    tokenize = encode
    detokenize = decode

    def save(self, path: str) -> None:
        self._tok.save(str(path))
        self.path = str(path)

    def _special_id(self, token: str) -> int:
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            where = self.path or "the tokenizer"
            raise ValueError(f"{where} has no {token!r} token (the end-of-document marker)")
        return token_id


def train_tokenizer(documents: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE on ``documents`` up to ``vocab_size`` ids (specials included)."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"data.tokenizer_vocab_size={vocab_size} is too small for byte-level BPE: "
            f"it needs at least {MIN_VOCAB_SIZE} (256 bytes + {len(SPECIAL_TOKENS)} special tokens)"
        )
    hf = HFTokenizer(models.BPE())
    # No prefix space: decode(encode(x)) must give back x exactly.
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        # All 256 byte symbols, seen in the corpus or not, so any text can be encoded.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(documents, trainer=trainer)
    return Tokenizer(hf)
