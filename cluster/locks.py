"""A lock file shared by processes: a run's state record, the data cache's builds."""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def exclusive_lock(path: Path | str) -> Iterator[None]:
    """An fcntl lock: released by the kernel even if the holder is killed, so it never goes stale.

    (flock may not reach across nodes on a network filesystem; preparers on different nodes
    sharing one cache dir are still safe, because the rename is atomic, only not deduplicated.)
    """
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
