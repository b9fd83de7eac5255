"""Instruction examples (prompt, response) from JSONL files or the built-in sets, and their split.

A JSONL line is ``{"prompt": str, "response": str}`` or ``{"messages": [{"role", "content"},
...]}``: the messages form becomes one example whose response is the last ``assistant`` message
and whose prompt is every message before it, each rendered as ``"<role>: <content>\\n"`` and the
prompt ending in ``"assistant:"`` (a simple template, not a chat format of any model).

Built-in sets (no download, the same on every machine with the same Python):

* ``"stdlib-docstrings"``: for every public top-level function with a docstring in the standard
  library's sources (read with ``ast``, nothing imported): prompt = the docstring's first
  paragraph, response = the function's ``module.name(signature)``;
* ``"arithmetic-qa"``: "What is a + b?" style questions with their answers, from a fixed seed.

The held-out split is chosen per example by a hash of its prompt, so it does not depend on the
order or on the other sources; duplicate prompts fall on the same side.
"""

from __future__ import annotations

import ast
import hashlib
import json
import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from moe_parallel.config.finetune import BUILTIN_INSTRUCTION_SETS
from moe_parallel.data.corpus import STDLIB_CODE, corpus_fingerprint, stdlib_files

STDLIB_DOCSTRINGS, ARITHMETIC_QA = BUILTIN_INSTRUCTION_SETS
_ARITHMETIC_EXAMPLES = 20_000
_DOC_CHARS = 400  # docstring paragraphs are cut here (whole words)
# Bump when the built-in sets or the readers change (invalidates the packed-data cache).
INSTRUCTIONS_FORMAT = 1


@dataclass(frozen=True)
class Example:
    prompt: str
    response: str


def iter_examples(source: str, max_examples: Optional[int] = None) -> Iterator[Example]:
    """The examples of one source, in its order, at most ``max_examples``."""
    n = 0
    for example in _read(source):
        if max_examples is not None and n >= max_examples:
            return
        if example.response:
            n += 1
            yield example


def is_held_out(example: Example, valid_fraction: float) -> bool:
    digest = hashlib.sha256(example.prompt.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < valid_fraction


def sources_fingerprint(sources: list[str]) -> str:
    """Changes when a file is edited (size, mtime) or the Python version changes (stdlib)."""
    h = hashlib.sha256(f"instructions-format={INSTRUCTIONS_FORMAT}".encode())
    for source in sources:
        h.update(f"\0{source}".encode())
        if source == STDLIB_DOCSTRINGS:
            h.update(corpus_fingerprint([STDLIB_CODE]).encode())
        elif source != ARITHMETIC_QA:
            for path in _files(source):
                st = path.stat()
                h.update(f"\0{path}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _read(source: str) -> Iterator[Example]:
    if source == STDLIB_DOCSTRINGS:
        yield from _stdlib_docstrings()
    elif source == ARITHMETIC_QA:
        yield from _arithmetic_qa()
    else:
        for path in _files(source):
            yield from _read_jsonl(path)


def _files(source: str) -> list[Path]:
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"finetune.sources: {source!r} does not exist (nor is it one of "
            f"the built-in sets {list(BUILTIN_INSTRUCTION_SETS)})"
        )
    if path.is_file():
        if path.suffix != ".jsonl":
            raise ValueError(f"finetune.sources: {source!r} is not a .jsonl file")
        return [path]
    files = sorted(p for p in path.rglob("*.jsonl") if p.is_file())
    if not files:
        raise ValueError(f"finetune.sources: the directory {source!r} holds no .jsonl files")
    return files


def _read_jsonl(path: Path) -> Iterator[Example]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({err})") from err
            yield _example(record, f"{path}:{lineno}")


def _example(record, where: str) -> Example:
    if (
        isinstance(record, dict)
        and isinstance(record.get("prompt"), str)
        and isinstance(record.get("response"), str)
    ):
        return Example(record["prompt"], record["response"])
    if isinstance(record, dict) and isinstance(record.get("messages"), list):
        return _from_messages(record["messages"], where)
    raise ValueError(
        f'{where}: expected {{"prompt": str, "response": str}} or '
        '{"messages": [{"role": ..., "content": ...}, ...]}'
    )


def _from_messages(messages: list, where: str) -> Example:
    for m in messages:
        if not (
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
        ):
            raise ValueError(f'{where}: every message needs a string "role" and "content"')
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError(f"{where}: the last message must be the assistant's (the response)")
    prompt = "".join(f"{m['role']}: {m['content']}\n" for m in messages[:-1]) + "assistant:"
    return Example(prompt, " " + messages[-1]["content"])


def _stdlib_docstrings() -> Iterator[Example]:
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in stdlib_files():
        module = ".".join(path.relative_to(root).with_suffix("").parts)
        if module.endswith(".__init__"):
            module = module[: -len(".__init__")]
        if any(part.startswith("_") for part in module.split(".")):
            continue
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError):
            continue  # a few stdlib files are fixtures in other encodings or grammars
        for node in tree.body:
            if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node)
            if not doc:
                continue
            summary = _first_paragraph(doc)
            if len(summary) < 12:
                continue
            prompt = (
                f"Which Python standard library function does this describe?\n{summary}\nFunction:"
            )
            yield Example(prompt, f" {module}.{node.name}({ast.unparse(node.args)})")


def _first_paragraph(doc: str) -> str:
    paragraph = " ".join(doc.strip().split("\n\n")[0].split())
    if len(paragraph) > _DOC_CHARS:
        paragraph = paragraph[:_DOC_CHARS].rsplit(" ", 1)[0]
    return paragraph


def _arithmetic_qa() -> Iterator[Example]:
    rng = random.Random(20240517)  # fixed: the set must not change between runs
    words = (("+", "plus"), ("-", "minus"), ("*", "times"))
    for _ in range(_ARITHMETIC_EXAMPLES):
        symbol, word = words[rng.randrange(3)]
        a, b = rng.randrange(1000), rng.randrange(100 if symbol == "*" else 1000)
        result = a + b if symbol == "+" else a - b if symbol == "-" else a * b
        yield Example(
            f"Question: what is {a} {word} {b}?\nAnswer:", f" {a} {symbol} {b} = {result}"
        )
