"""Chunk hashes computed by the async writers (the publish step reads these instead of the
whole checkpoint): they are the SHA-256 of each written byte range as it is on disk."""

import hashlib

from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import MetadataIndex
from torch.distributed.checkpoint.storage import WriteResult

from moe_parallel.ckpt.async_save import _hash_written_chunks
from moe_parallel.ckpt.manifest import WRITER_HASHES, _writer_hashes, remove_writer_hashes


def _result(name: str, start: int, length: int) -> WriteResult:
    return WriteResult(
        index=MetadataIndex("t"),
        size_in_bytes=length,
        storage_data=_StorageInfo(name, start, length),
    )


def test_writer_hashes_are_those_of_the_bytes_on_disk(tmp_path):
    data = bytes(range(256)) * 40
    (tmp_path / "__0_0.distcp").write_bytes(data)
    (tmp_path / "__0_1.distcp").write_bytes(data[::-1])
    results = {
        0: [_result("__0_0.distcp", 0, 1000), _result("__0_0.distcp", 1000, 9240)],
        1: [_result("__0_1.distcp", 100, 50)],
    }
    _hash_written_chunks(tmp_path, results)
    expected = {
        ("__0_0.distcp", 0, 1000): hashlib.sha256(data[:1000]).hexdigest(),
        ("__0_0.distcp", 1000, 9240): hashlib.sha256(data[1000:]).hexdigest(),
        ("__0_1.distcp", 100, 50): hashlib.sha256(data[::-1][100:150]).hexdigest(),
    }
    assert _writer_hashes(tmp_path) == expected
    remove_writer_hashes(tmp_path)
    assert not list(tmp_path.glob(f"*{WRITER_HASHES}"))
    assert _writer_hashes(tmp_path) == {}
