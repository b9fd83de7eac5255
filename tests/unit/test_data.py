"""Data package: corpus reading, tokenizer, cached preparation, Megatron GPT datasets."""

from __future__ import annotations

import importlib
import json
import pickle
import threading
from pathlib import Path
from pydoc_data.topics import topics

import numpy as np
import pytest

from moe_parallel.config.schema import DataConfig
from moe_parallel.data import (
    Tokenizer,
    build_gpt_datasets,
    corpus_fingerprint,
    iter_documents,
    prepare,
    train_tokenizer,
)

# The package re-exports the function prepare(), which shadows the submodule of the same name.
prepare_mod = importlib.import_module("moe_parallel.data.prepare")

MAX_BYTES = 200_000
VOCAB = 512
SEQ = 64
SPLIT = "80,20,0"  # a 200 kB corpus has too few documents for the default 2% validation share


def _cfg(cache: Path, **kw) -> DataConfig:
    base = dict(sources=["python-stdlib"], max_bytes=MAX_BYTES, tokenizer_vocab_size=VOCAB)
    return DataConfig(cache_dir=str(cache), **{**base, **kw})


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return prepare(_cfg(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="module")
def tokenizer(prepared):
    return Tokenizer.from_file(prepared.tokenizer_path)


# --- corpus -------------------------------------------------------------------------------------


def test_stdlib_corpus_is_deterministic_and_capped():
    docs = list(iter_documents(["python-stdlib"], MAX_BYTES))
    assert docs == list(iter_documents(["python-stdlib"], MAX_BYTES))
    total = sum(len(d.encode("utf-8")) for d in docs)
    # The last document is cut at the cap, at most a partial UTF-8 character (3 bytes) short.
    assert MAX_BYTES - 3 <= total <= MAX_BYTES
    assert all(docs)
    fp = corpus_fingerprint(["python-stdlib"], MAX_BYTES)
    assert fp == corpus_fingerprint(["python-stdlib"], MAX_BYTES)
    assert fp != corpus_fingerprint(["python-stdlib"], MAX_BYTES + 1)


def test_directory_source_reads_txt_and_jsonl_in_sorted_order(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.txt").write_text("zeta")
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n\n{"text": "two", "id": 2}\n')
    (tmp_path / "b" / "ignored.md").write_text("not a source")
    assert list(iter_documents([str(tmp_path)], None)) == ["one", "two", "zeta"]
    assert list(iter_documents([str(tmp_path)], 5)) == ["one", "tw"]


def test_jsonl_line_without_text_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
        list(iter_documents([str(bad)], None))


def test_missing_source_names_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "corpus.txt"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        iter_documents(["python-stdlib", str(missing)], None)


# --- tokenizer ----------------------------------------------------------------------------------


def test_tokenizer_round_trips_and_keeps_special_tokens_out_of_text(tokenizer):
    assert (tokenizer.eod, tokenizer.pad) == (0, 1)
    assert tokenizer.vocab_size == VOCAB
    text = next(iter(iter_documents(["python-stdlib"], 20_000)))
    text += "\n# héllo, 日本語 <|endoftext|> \t\n"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.eod not in ids  # literal "<|endoftext|>" in text is not a document break
    assert max(ids) < tokenizer.vocab_size
    clone = pickle.loads(pickle.dumps(tokenizer))
    assert clone.encode(text) == ids
    assert clone.unique_identifiers == tokenizer.unique_identifiers


def test_foreign_tokenizer_needs_eod_and_may_lack_pad():
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    hf = HFTokenizer(models.BPE())
    with pytest.raises(ValueError, match="endoftext"):
        Tokenizer(hf)
    hf.add_special_tokens(["<|endoftext|>"])
    assert (Tokenizer(hf).eod, Tokenizer(hf).pad) == (0, -1)  # -1: Megatron's "no pad" sentinel


def test_tokenizer_rejects_tiny_vocab():
    with pytest.raises(ValueError, match="tokenizer_vocab_size=100"):
        train_tokenizer(["abc"], 100)


# --- prepare ------------------------------------------------------------------------------------


def test_prepared_counts_match_encoding(prepared, tokenizer):
    docs = list(iter_documents(["python-stdlib"], MAX_BYTES))
    expected = sum(len(ids) + 1 for ids in tokenizer.encode_batch(docs))  # + EOD per document
    assert prepared.num_documents == len(docs)
    assert prepared.num_tokens == expected
    assert prepared.vocab_size == VOCAB
    (prefix,) = prepared.prefixes
    assert Path(prefix + ".bin").stat().st_size == 2 * expected  # uint16 tokens
    assert prepare_mod.document_lengths(prefix).sum() == expected


def test_second_prepare_reuses_the_cache(tmp_path, monkeypatch):
    builds = []
    real_build = prepare_mod._build
    monkeypatch.setattr(prepare_mod, "_build", lambda *a: builds.append(1) or real_build(*a))
    first = prepare(_cfg(tmp_path))
    bin_path = Path(first.prefixes[0] + ".bin")
    mtime = bin_path.stat().st_mtime_ns
    second = prepare(_cfg(tmp_path))
    assert second == first
    assert builds == [1]
    assert bin_path.stat().st_mtime_ns == mtime
    # A different vocab size is a different cache entry.
    assert prepare(_cfg(tmp_path, tokenizer_vocab_size=VOCAB + 64)).prefixes != first.prefixes


def test_concurrent_preparers_build_once(tmp_path, monkeypatch):
    builds = []
    real_build = prepare_mod._build
    monkeypatch.setattr(prepare_mod, "_build", lambda *a: builds.append(1) or real_build(*a))
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(prepare(_cfg(tmp_path, max_bytes=50_000))))
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2 and results[0] == results[1]
    assert builds == [1]


def test_failed_prepare_leaves_nothing_trusted(tmp_path, monkeypatch):
    def crash(*args):
        raise RuntimeError("disk full")

    monkeypatch.setattr(prepare_mod, "_write_indexed", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        prepare(_cfg(tmp_path, max_bytes=50_000))
    prepared_dir = tmp_path / "prepared"
    assert [p.name for p in prepared_dir.iterdir() if not p.name.endswith(".lock")] == []
    monkeypatch.undo()
    result = prepare(_cfg(tmp_path, max_bytes=50_000))
    assert result.num_tokens > 0


def test_given_prefixes_are_validated(prepared, tmp_path):
    cfg = DataConfig(prefixes=prepared.prefixes, tokenizer=prepared.tokenizer_path)
    given = prepare(cfg)
    assert (given.num_tokens, given.num_documents) == (prepared.num_tokens, prepared.num_documents)
    assert given.vocab_size == prepared.vocab_size
    with pytest.raises(ValueError, match="data.tokenizer"):
        prepare(DataConfig(prefixes=prepared.prefixes))
    missing = str(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="absent.bin"):
        prepare(DataConfig(prefixes=[missing], tokenizer=prepared.tokenizer_path))


# --- GPT datasets -------------------------------------------------------------------------------


def _build(prepared, cache: Path, seed: int = 1234, num_samples=(100, 10, 0)):
    return build_gpt_datasets(prepared, SPLIT, SEQ, seed, num_samples, str(cache))


def test_gpt_samples_are_shifted_windows(prepared, tokenizer, tmp_path):
    train, valid, test = _build(prepared, tmp_path)
    assert test is None  # its share in SPLIT is 0
    assert len(train) >= 100 and len(valid) >= 10
    stream = np.fromfile(prepared.prefixes[0] + ".bin", dtype=np.uint16).astype(np.int64)
    for i in (0, 1, len(train) - 1):
        sample = train[i]
        assert set(sample) == {"tokens", "labels", "loss_mask", "position_ids"}
        for key in ("tokens", "labels", "position_ids"):
            assert sample[key].shape == (SEQ,) and str(sample[key].dtype) == "torch.int64"
        assert str(sample["loss_mask"].dtype) == "torch.float32"
        tokens, labels = sample["tokens"].numpy(), sample["labels"].numpy()
        assert (tokens[1:] == labels[:-1]).all()
        assert sample["loss_mask"].sum() == SEQ
        assert (sample["position_ids"].numpy() == np.arange(SEQ)).all()
        assert tokens.max() < tokenizer.vocab_size
    # A sample inside one document is a contiguous window of the prepared token stream.
    windows = (np.append(train[i]["tokens"].numpy(), train[i]["labels"][-1]) for i in range(50))
    window = next(w for w in windows if tokenizer.eod not in w)
    all_windows = np.lib.stride_tricks.sliding_window_view(stream, SEQ + 1)
    assert (all_windows == window).all(axis=1).any()


def test_same_seed_same_samples(prepared, tmp_path):
    first, _, _ = _build(prepared, tmp_path / "a", seed=7)
    again, _, _ = _build(prepared, tmp_path / "b", seed=7)  # recomputed, not read from cache
    other, _, _ = _build(prepared, tmp_path / "c", seed=8)
    pick = range(0, 100, 9)
    assert all((first[i]["tokens"] == again[i]["tokens"]).all() for i in pick)
    assert any((first[i]["tokens"] != other[i]["tokens"]).any() for i in pick)


def test_index_cache_is_written_once(prepared, tmp_path):
    _build(prepared, tmp_path)
    files = sorted(tmp_path.glob("*.npy"))
    assert files
    mtimes = [f.stat().st_mtime_ns for f in files]
    _build(prepared, tmp_path)
    assert sorted(tmp_path.glob("*.npy")) == files
    assert [f.stat().st_mtime_ns for f in files] == mtimes


def test_weighted_blend_of_two_prefixes(prepared, tmp_path):
    corpus = tmp_path / "other.jsonl"
    lines = [json.dumps({"text": topics[k]}) for k in sorted(topics)[:40]]
    corpus.write_text("\n".join(lines) + "\n")
    other = prepare(
        DataConfig(
            sources=[str(corpus)],
            tokenizer=prepared.tokenizer_path,
            cache_dir=str(tmp_path),
        )
    )
    assert other.tokenizer_path != prepared.tokenizer_path  # a copy inside its own cache entry
    blend = prepare_mod.PreparedData(
        prefixes=prepared.prefixes + other.prefixes,
        weights=[0.75, 0.25],
        tokenizer_path=prepared.tokenizer_path,
        vocab_size=prepared.vocab_size,
        num_tokens=prepared.num_tokens + other.num_tokens,
        num_documents=prepared.num_documents + other.num_documents,
    )
    train, valid, _ = _build(blend, tmp_path / "idx", num_samples=(200, 20, 0))
    assert len(train) >= 200 and len(valid) >= 20
    ids = np.array([int(train[i]["dataset_id"]) for i in range(200)])
    assert set(ids) == {0, 1}
    assert abs((ids == 0).mean() - 0.75) < 0.05
    assert train[0]["tokens"].shape == (SEQ,)


def test_split_without_enough_tokens_is_an_error(prepared, tmp_path):
    with pytest.raises(ValueError, match="valid part"):
        build_gpt_datasets(prepared, "99.9,0.1,0", SEQ, 1, (10, 10, 0), str(tmp_path))


@pytest.mark.timeout(60)
def test_unrequested_split_without_documents_does_not_hang(prepared, tmp_path):
    # The valid share rounds to zero documents; only training samples are asked for. Megatron
    # would loop forever building the empty valid split for "0 samples".
    train, valid, _ = build_gpt_datasets(prepared, "99.9,0.1,0", SEQ, 1, (10, 0, 0), str(tmp_path))
    assert len(train) >= 10
    assert valid is None or len(valid) == 0
