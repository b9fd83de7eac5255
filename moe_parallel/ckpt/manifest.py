"""Checkpoint manifests: what a checkpoint holds, and proof that its bytes are the ones written.

``manifest.json`` is written last into a finished save (before the rename that publishes it):
every tensor's global name, shape and dtype (from the torch_dist metadata), and a SHA-256 of every
stored chunk: each ``(tensor, byte range in a .distcp file)`` the metadata points at, plus every
other file. ``verify`` recomputes them and names the tensor whose bytes changed; loading refuses a
checkpoint that fails it. A chunk's hash is of the bytes as stored, so verification needs no
process group and no knowledge of the layout that wrote it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from .files import write_durable

MANIFEST = "manifest.json"
_NOT_HASHED = {MANIFEST}
_BLOCK = 1 << 20
# Chunk hashes an async writer computed of the file it had just written (see write_chunk_hashes);
# consumed by build_manifest, removed before the checkpoint is published.
WRITER_HASHES = ".chunk-sha256.json"


@dataclass
class Problem:
    what: str  # tensor name, or file name for files that are not tensor storage
    reason: str

    def __str__(self) -> str:
        return f"{self.what}: {self.reason}"


class CheckpointCorrupt(RuntimeError):
    """A checkpoint whose manifest is missing or does not match its files."""


def build_manifest(path: Path, extra: dict) -> dict:
    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(str(path)).read_metadata()
    tensors = {}
    for name, item in meta.state_dict_metadata.items():
        if hasattr(item, "size"):
            tensors[name] = {"shape": list(item.size), "dtype": str(item.properties.dtype)}
    hashed = _writer_hashes(path)
    chunks = []
    for index, info in meta.storage_data.items():
        digest = hashed.get((info.relative_path, info.offset, info.length))
        if digest is None:  # written by a synchronous save: hashed here, from the disk
            digest = _hash_range(path / info.relative_path, info.offset, info.length)
        chunks.append(
            {
                "tensor": index.fqn,
                "offset": list(index.offset or []),
                "file": info.relative_path,
                "start": info.offset,
                "length": info.length,
                "sha256": digest,
            }
        )
    chunk_files = {c["file"] for c in chunks}
    files = {
        p.name: _hash_file(p)
        for p in sorted(path.iterdir())
        if p.is_file()
        and p.name not in _NOT_HASHED
        and p.name not in chunk_files
        and not p.name.endswith(WRITER_HASHES)
    }
    sizes = {p.name: p.stat().st_size for p in path.iterdir() if p.name in chunk_files}
    return {
        "version": 1,
        **extra,
        "tensors": tensors,
        "chunks": chunks,
        "files": files,
        "chunk_file_sizes": sizes,
    }


def write_chunk_hashes(file: Path, ranges: list[tuple[int, int]]) -> None:
    """In a writer, right after writing ``file``: hash each (start, length) chunk of it as it is
    on disk, so that publishing the checkpoint need not read it all again."""
    digests = [[start, length, _hash_range(file, start, length)] for start, length in ranges]
    write_durable(file.with_name(file.name + WRITER_HASHES), json.dumps(digests))


def _writer_hashes(path: Path) -> dict[tuple[str, int, int], str]:
    found = {}
    for sidecar in path.glob(f"*{WRITER_HASHES}"):
        name = sidecar.name[: -len(WRITER_HASHES)]
        for start, length, digest in json.loads(sidecar.read_text()):
            found[(name, start, length)] = digest
    return found


def remove_writer_hashes(path: Path) -> None:
    for sidecar in path.glob(f"*{WRITER_HASHES}"):
        sidecar.unlink()


def write_manifest(path: Path, manifest: dict) -> None:
    write_durable(path / MANIFEST, json.dumps(manifest, indent=1))


def read_manifest(path: Path) -> dict:
    file = path / MANIFEST
    if not file.is_file():
        raise CheckpointCorrupt(f"{path}: {MANIFEST} is missing; the checkpoint cannot be verified")
    return json.loads(file.read_text())


def verify(path: Path) -> list[Problem]:
    """Every mismatch between the manifest and the files, tensors named; [] when intact."""
    manifest = read_manifest(path)
    problems = []
    for name, size in manifest["chunk_file_sizes"].items():
        actual = (path / name).stat().st_size if (path / name).is_file() else None
        if actual != size:
            problems.append(Problem(name, f"size {actual}, expected {size}"))
    for c in manifest["chunks"]:
        file = path / c["file"]
        if not file.is_file():
            problems.append(Problem(_tensor_name(c), f"its file {c['file']} is missing"))
        elif _hash_range(file, c["start"], c["length"]) != c["sha256"]:
            problems.append(
                Problem(
                    _tensor_name(c),
                    f"bytes {c['start']}..{c['start'] + c['length']}"
                    f" of {c['file']} do not match the manifest",
                )
            )
    for name, digest in manifest["files"].items():
        file = path / name
        if not file.is_file():
            problems.append(Problem(name, "missing"))
        elif _hash_file(file) != digest:
            problems.append(Problem(name, "contents do not match the manifest"))
    return problems


def require_intact(path: Path) -> None:
    problems = verify(path)
    if problems:
        shown = "\n  ".join(str(p) for p in problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise CheckpointCorrupt(f"{path} failed verification:\n  {shown}{more}")


def _tensor_name(chunk: dict) -> str:
    # Megatron stores ShardedObjects as "<key>/shard_<i>_<n>"; tensors under their global key.
    name = chunk["tensor"]
    return f"tensor {name}" + (f" (chunk at {chunk['offset']})" if chunk["offset"] else "")


def _hash_range(file: Path, start: int, length: int) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        f.seek(start)
        left = length
        while left > 0:
            block = f.read(min(_BLOCK, left))
            if not block:
                break
            h.update(block)
            left -= len(block)
    return h.hexdigest()


def _hash_file(file: Path) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(_BLOCK), b""):
            h.update(block)
    return h.hexdigest()
