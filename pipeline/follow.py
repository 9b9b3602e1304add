"""Read a download while it is still being written: decompress follows fetch.

Fetching a layer and then decompressing it leaves the CPU idle during the download and
the network idle during the inflate. Instead, the fetch writes the blob to its staging
file as before and reports each write here, and decompression reads the same file
through a `GrowingFile` reader, waiting at the end for more. The reader reports end of
file only after the fetch has verified the whole blob's digest, so nothing downstream can
commit an entry made from bytes that were not verified.

Reads go through the kernel (pread on a duplicate of the writer's descriptor), so the
blob is read back from the page cache: no disk read, no second buffer of it in memory.
"""

from __future__ import annotations

import os
import threading

from pipeline.errors import LayerwarmError


class StreamAbandoned(LayerwarmError):
    """The download this reader followed failed or started over; decompress from staging."""


class GrowingFile:
    """Shared between one writer (the fetch) and one reader (the decompression)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._fd: int | None = None
        self._generation = 0  # a new one each time the writer starts the file over
        self._size = 0
        self._finished = False
        self._failed = False
        self._closed = False

    @property
    def restarted(self) -> bool:
        """Whether the writer started the file over at least once (a reader may have read
        bytes that are no longer there)."""
        with self._cond:
            return self._generation > 1

    # -------------------------------------------------------------- writer side

    def attach(self, fd: int, size: int) -> None:
        """The writer (re)opened the file; its first ``size`` bytes are already good."""
        with self._cond:
            self._close_fd()
            self._fd = None if self._closed else os.dup(fd)
            self._generation += 1
            self._size = size
            self._cond.notify_all()

    def wrote(self, nbytes: int) -> None:
        with self._cond:
            self._size += nbytes
            self._cond.notify_all()

    def finish(self) -> None:
        """The whole blob is written and its digest verified: the reader may see its end."""
        with self._cond:
            self._finished = True
            self._cond.notify_all()

    def fail(self) -> None:
        with self._cond:
            self._failed = True
            self._cond.notify_all()

    def close(self) -> None:
        """Both sides are done: release the descriptor."""
        with self._cond:
            self._closed = True
            self._close_fd()
            self._cond.notify_all()

    def _close_fd(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    # -------------------------------------------------------------- reader side

    def reader(self) -> GrowingReader:
        return GrowingReader(self)

    def _read(self, generation: int, pos: int, n: int) -> tuple[int, bytes]:
        with self._cond:
            while True:
                if self._failed or self._closed:
                    raise StreamAbandoned("the download being followed did not complete")
                if self._generation != generation:
                    if pos:  # bytes already consumed came from a file that is now gone
                        raise StreamAbandoned("the download being followed started over")
                    generation = self._generation
                if self._fd is not None and self._size > pos:
                    want = self._size - pos if n < 0 else min(n, self._size - pos)
                    return generation, os.pread(self._fd, want, pos)
                if self._finished and self._fd is not None:
                    return generation, b""
                self._cond.wait()


class GrowingReader:
    """Reads a `GrowingFile`: `read(n)` blocks until there is data (at most n bytes; any
    amount there is for n < 0) or the verified end (b"")."""

    def __init__(self, growing: GrowingFile) -> None:
        self._growing = growing
        self._generation = 0
        self._pos = 0

    def read(self, n: int = -1) -> bytes:
        self._generation, data = self._growing._read(self._generation, self._pos, n)
        self._pos += len(data)
        return data
