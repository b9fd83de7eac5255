"""Streams a growing log file to a text stream (rank 0's log to the launcher's stdout).

The rank writes straight into its log file, never into a pipe, so a slow or absent reader can
never block it.  A thread follows the file and copies new bytes to the stream.
"""

from __future__ import annotations

import codecs
import sys
import threading
from pathlib import Path
from typing import TextIO

_CHUNK = 64 * 1024


class LogStreamer:
    """Follows ``path`` in a thread, writing what is appended to ``out`` (None: sys.stdout,
    looked up at each write so redirections made after start are honoured).

    Streaming starts at the file's size when the streamer is created, so output of an earlier
    attempt in the same run directory is not repeated.
    """

    def __init__(self, path: Path, out: TextIO | None = None, poll_s: float = 0.05) -> None:
        self.path = path
        self._out = out
        self._poll_s = poll_s
        self._stop = threading.Event()
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._offset = path.stat().st_size if path.exists() else 0
        self._thread = threading.Thread(target=self._run, name=f"tail:{path.name}", daemon=True)
        self.error: BaseException | None = None

    def start(self) -> LogStreamer:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Copy what is left in the file, then stop. Re-raises an error the thread hit."""
        self._stop.set()
        self._thread.join()
        if self.error is not None:
            raise RuntimeError(f"streaming {self.path} failed: {self.error!r}") from self.error

    def _run(self) -> None:
        try:
            while not self._stop.wait(self._poll_s):
                self._copy_new()
            self._copy_new()
            self._emit(self._decoder.decode(b"", final=True))
        except BaseException as e:  # handed to stop(), which re-raises it
            self.error = e

    def _copy_new(self) -> None:
        if not self.path.exists():
            return
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            while chunk := f.read(_CHUNK):
                self._offset += len(chunk)
                self._emit(self._decoder.decode(chunk))

    def _emit(self, text: str) -> None:
        if not text:
            return
        out = self._out if self._out is not None else sys.stdout
        if out is None:
            return
        out.write(text)
        out.flush()
