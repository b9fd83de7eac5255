"""A lock file shared by processes: a run's state record, the data cache's builds."""

from __future__ import annotations

import fcntl
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class LockTimeout(TimeoutError):
    """``exclusive_lock(..., timeout_s=...)`` waited that long while another process held the lock."""


@contextmanager
def exclusive_lock(path: Path | str, timeout_s: float | None = None) -> Iterator[None]:
    """An fcntl lock: released by the kernel even if the holder is killed, so it never goes stale.

    (flock may not reach across nodes on a network filesystem; preparers on different nodes
    sharing one cache dir are still safe, because the rename is atomic, only not deduplicated.)

    ``timeout_s``: give up with LockTimeout after waiting that long (None: wait as long as it takes).
    """
    with open(path, "a") as f:
        if timeout_s is None:
            fcntl.flock(f, fcntl.LOCK_EX)
        else:
            _flock_within(f, path, timeout_s)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _flock_within(f, path: Path | str, timeout_s: float) -> None:
    """Take the exclusive flock on the open file ``f``, polling until ``timeout_s`` has passed."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise LockTimeout(
                    f"{path} has been locked by another process for more than {timeout_s:.0f} s"
                ) from None
            time.sleep(0.2)
