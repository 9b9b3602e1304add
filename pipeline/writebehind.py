"""Write a new file to disk while it is being made, and leave it out of the page cache.

An entry is written once and read later, if ever, by someone else: left in the page
cache it would push out the node's hot pages, and a machine that writes it only when the
caller's fsync asks has the disk idle while the layer is decompressed and busy after.
So the writes are buffered, and as each WINDOW of the file fills, the kernel is asked to
start writing it to disk (sync_file_range WRITE: its writeback sends large requests, many
at a time). Two windows later, that window is written: waiting for it costs nothing, and
its now clean pages are dropped from the cache (fadvise DONTNEED), so the pages the next
windows take are ones just freed. `close` does the same for the rest, and the caller's
fsync is left with only the disk's own cache to flush.

This replaced writing past the cache with O_DIRECT, one MiB at a time: one request in
flight made the write the slowest stage on a disk slower than the decompression, and
the final fsync still had the device's cache to flush (docs/ARCHITECTURE.md, "One layer,
embedded"). Where sync_file_range is missing (not Linux), the writes are plain buffered
ones and the fsync does all the work.
"""

from __future__ import annotations

import errno
import functools
import os
from collections.abc import Callable
from types import TracebackType
from typing import BinaryIO

WINDOW = 8 << 20
# <linux/fs.h>
_WAIT_BEFORE, _WRITE, _WAIT_AFTER = 1, 2, 4
_WRITTEN = _WAIT_BEFORE | _WRITE | _WAIT_AFTER  # returns once the range is on the disk
_NOT_A_FILE = (errno.ESPIPE, errno.EINVAL)  # a pipe or device: nothing to write back


# Looked up at the first window, not at import: a warm whose layers are all on disk
# writes nothing. From the symbols the process already has (dlopen(NULL): the C library
# is loaded in every CPython), not by `ctypes.util.find_library("c")`, which imports
# subprocess and runs `ldconfig -p` in a child: ~20 ms on the write thread, in the middle
# of a cold warm's first layer, while the decompressor waited on the full queue.
@functools.cache
def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    import ctypes

    try:
        call = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):  # not Linux/glibc: plain buffered writes
        return None
    call.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    call.restype = ctypes.c_int
    return call


def preload() -> None:
    """Look up sync_file_range now (see `_load_sync_file_range`), for a long-running worker."""
    _load_sync_file_range()


class WriteBehind:
    """Appends to `out` from its current offset; `close` (or leaving the `with` block
    without an error) writes the rest to disk, drops the file from the page cache and
    leaves `out` positioned at its end."""

    def __init__(self, out: BinaryIO) -> None:
        out.flush()
        self._out, self._fd = out, out.fileno()
        self._start = self._pos = self._sent = out.tell()  # _sent: writeback asked up to
        self._sync = _load_sync_file_range()

    def write(self, chunk: bytes | memoryview) -> None:
        data = memoryview(chunk)
        while data:
            n = os.pwrite(self._fd, data, self._pos)
            self._pos += n
            data = data[n:]
        while self._sync is not None and self._pos - self._sent >= WINDOW:
            self._range(self._sent, WINDOW, _WRITE)
            self._sent += WINDOW
            written = self._sent - 3 * WINDOW  # two windows behind the one just sent
            if written >= self._start:
                self._drop(written, WINDOW)

    def close(self) -> None:
        if self._sync is not None and self._pos > self._start:
            self._drop(self._start, self._pos - self._start)
        self._out.seek(self._pos)

    def __enter__(self) -> WriteBehind:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        """`close` when the block succeeded; when it raised, the file is being dropped."""
        if exc_type is None:
            self.close()

    def _drop(self, offset: int, nbytes: int) -> None:
        """Wait until the range is on the disk, then give its clean pages back."""
        self._range(offset, nbytes, _WRITTEN)
        if self._sync is not None:
            os.posix_fadvise(self._fd, offset, nbytes, os.POSIX_FADV_DONTNEED)

    def _range(self, offset: int, nbytes: int, flags: int) -> None:
        assert self._sync is not None
        if self._sync(self._fd, offset, nbytes, flags) != 0:
            import ctypes  # loaded already, by _load_sync_file_range

            err = ctypes.get_errno()
            if err not in _NOT_A_FILE:
                raise OSError(err, f"writing to disk: {os.strerror(err)}")
            self._sync = None  # not a file: there is nothing to write back or drop
