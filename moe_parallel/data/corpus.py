"""Raw text documents from the configured sources, in a deterministic order.

A source is one of the built-in corpora that need no download (text on every machine, for the
tiny runs and the BTX demo domains):

* ``"python-stdlib"``: the standard library's ``.py`` files, then the pydoc topics;
* ``"python-stdlib-code"``: only the ``.py`` files (the BTX demo's code domain);
* ``"python-stdlib-docs"``: only the pydoc topics, the language reference in prose (prose domain);
* ``"arithmetic"``: generated sums, differences and products with their results (arithmetic
  domain), the same on every machine;

or a ``.txt`` file (one document), a ``.jsonl`` file (one document per line, field ``"text"``)
or a directory of those.
Everything is read in sorted order so that the same sources and ``max_bytes`` always give the same
documents, which is what makes the prepared-data cache (keyed by ``corpus_fingerprint``) sound.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig
from pathlib import Path
from typing import Iterator, Optional

STDLIB = "python-stdlib"
STDLIB_CODE = "python-stdlib-code"
STDLIB_DOCS = "python-stdlib-docs"
ARITHMETIC = "arithmetic"
BUILTIN_SOURCES = (STDLIB, STDLIB_CODE, STDLIB_DOCS, ARITHMETIC)
_ARITHMETIC_DOCS = 20_000  # about 8 MB; max_bytes takes fewer
_ARITHMETIC_LINES = 16  # problems per document
# Bump when the selection or reading rules change, so caches built under old rules are not reused.
CORPUS_FORMAT = 1
_TEXT_SUFFIXES = (".txt", ".jsonl")
_SKIPPED_STDLIB_DIRS = {"site-packages", "dist-packages", "test", "tests", "__pycache__"}


def iter_documents(sources: list[str], max_bytes: Optional[int] = None) -> Iterator[str]:
    """Yield the documents of ``sources`` in order, stopping after ``max_bytes`` of UTF-8 text.

    The document that crosses the cap is cut at the last whole character below it, so the total
    is at most ``max_bytes`` and is the same on every run. Empty documents are skipped: they would
    only add a lone EOD token to the prepared data.
    """
    # Checked here, not inside the generator, so a bad path fails at the call, before any work.
    _check_sources(sources)
    return _iter_capped(sources, max_bytes)


def _iter_capped(sources: list[str], max_bytes: Optional[int]) -> Iterator[str]:
    budget = max_bytes
    for source in sources:
        for doc in _iter_source(source):
            if budget is not None:
                raw = doc.encode("utf-8")
                if len(raw) >= budget:
                    doc = raw[:budget].decode("utf-8", errors="ignore")
                    if doc:
                        yield doc
                    return
                budget -= len(raw)
            if doc:
                yield doc


def corpus_fingerprint(sources: list[str], max_bytes: Optional[int] = None) -> str:
    """A short hash of the content selection: paths, sizes and mtimes of every file read.

    It changes when a file is edited, added or removed (or the Python version changes, for the
    stdlib), so a cache keyed by it is rebuilt instead of silently serving stale data.
    """
    h = hashlib.sha256(f"corpus-format={CORPUS_FORMAT};max_bytes={max_bytes}".encode())
    for source in sources:
        h.update(f"\0source={source}".encode())
        if source in (STDLIB, STDLIB_CODE, STDLIB_DOCS):
            h.update(f";python={sys.version}".encode())
        for path in _source_files(source):
            st = path.stat()
            h.update(f"\0{path}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _check_sources(sources: list[str]) -> None:
    if not sources:
        raise ValueError("data.sources is empty: name at least one source (e.g. 'python-stdlib')")
    for source in sources:
        if source in BUILTIN_SOURCES:
            continue
        path = Path(source).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"data source {source!r} does not exist")
        if path.is_file() and path.suffix not in _TEXT_SUFFIXES:
            raise ValueError(
                f"data source {source!r}: expected a .txt or .jsonl file, or a directory of them"
            )


def _iter_source(source: str) -> Iterator[str]:
    if source in BUILTIN_SOURCES:
        yield from _BUILTIN[source]()
        return
    for path in _source_files(source):
        if path.suffix == ".jsonl":
            yield from _iter_jsonl(path)
        else:
            yield _read_utf8(path)


def _source_files(source: str) -> list[Path]:
    """The files a source reads, in the order they are read (none for generated text)."""
    if source in (STDLIB, STDLIB_CODE):
        return stdlib_files()
    if source in (STDLIB_DOCS, ARITHMETIC):
        return []  # the topics are covered by the Python version; arithmetic by CORPUS_FORMAT
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"data source {source!r} does not exist")
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.suffix in _TEXT_SUFFIXES and p.is_file())
    if not files:
        raise ValueError(f"data source {source!r} is a directory without .txt or .jsonl files")
    return files


def _read_utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not valid UTF-8 ({err})") from err


def _iter_jsonl(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue  # blank lines (e.g. a trailing newline) are not documents
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({err})") from err
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise ValueError(f'{path}:{lineno}: expected an object with a string field "text"')
            yield text


def stdlib_files() -> list[Path]:
    """The Python standard library's .py files (tests and installed packages left out), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Pruning in place stops os.walk from descending into tests and installed packages.
        dirnames[:] = [d for d in dirnames if d not in _SKIPPED_STDLIB_DIRS]
        files.extend(Path(dirpath, name) for name in filenames if name.endswith(".py"))
    return sorted(files)


def _iter_stdlib() -> Iterator[str]:
    yield from _iter_stdlib_code()
    yield from _iter_stdlib_docs()


def _iter_stdlib_code() -> Iterator[str]:
    for path in stdlib_files():
        try:
            yield path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # a few stdlib test fixtures are deliberately not UTF-8; they are not prose


def _iter_stdlib_docs() -> Iterator[str]:
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield topics[key]


def _iter_arithmetic() -> Iterator[str]:
    """Documents of integer problems with their answers, from a fixed seed (same everywhere)."""
    import random

    rng = random.Random(20240311)  # fixed: the corpus must not change between runs
    ops = (("+", lambda a, b: a + b), ("-", lambda a, b: a - b), ("*", lambda a, b: a * b))
    for _ in range(_ARITHMETIC_DOCS):
        lines = []
        for _ in range(_ARITHMETIC_LINES):
            symbol, fn = ops[rng.randrange(3)]
            a, b = rng.randrange(1000), rng.randrange(1000 if symbol != "*" else 100)
            lines.append(f"{a} {symbol} {b} = {fn(a, b)}")
        yield "\n".join(lines) + "\n"


_BUILTIN = {
    STDLIB: _iter_stdlib,
    STDLIB_CODE: _iter_stdlib_code,
    STDLIB_DOCS: _iter_stdlib_docs,
    ARITHMETIC: _iter_arithmetic,
}
