"""Write a new file to disk while it is being made, and leave it out of the page cache.

An entry is written once and read later, if ever, by someone else: left in the page
cache it would push out the node's hot pages (unless its publish reads it next:
`keep_cached`), and a machine that writes it only when the caller's fsync asks has the
disk idle while the layer is decompressed and busy after.
So the writes are buffered, and as each WINDOW of the file fills, the kernel is asked to
start writing it to disk (sync_file_range WRITE: its writeback sends large requests, many
at a time). Two windows later, that window is written: waiting for it costs nothing, and
its now clean pages are dropped from the cache (fadvise DONTNEED), so the pages the next
windows take are ones just freed. `close` only starts the rest's writeback: the caller's
fsync waits for it (off the CPU pool, pipeline/stages.py: `decompress_stream`), and
`drop_cached` then gives back the pages of the whole, now clean, file.

That leaves the disk's own cache, which the caller's fsync flushes: on the bench machine
~0.4 s after a 500 MiB entry, with both cores idle. So every FLUSH_EVERY bytes, a thread
of its own flushes it (fdatasync) while the writing goes on, and the fsync has only the
last part left. Cold warms, medians of 6 interleaved with and without: the big gzip
image 1.98 -> 1.60 s, the big zstd image 1.75 -> 1.54 s, the 12-image fleet (one layer
over 64 MiB) 2.47 -> 2.46 s. A background flush's error is raised by `close`: the fsync
that follows on the same open file would not report it again.

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
import threading
from collections.abc import Callable
from types import TracebackType
from typing import BinaryIO

WINDOW = 8 << 20  # 2, 8 and 32 MiB measured alike
FLUSH_EVERY = 64 << 20  # on the big layer, medians of 4: 1.79 s, against 1.94 s at 128 MiB
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
    without an error) starts the rest's writeback, waits for a background flush to end
    and leaves `out` positioned at its end. The caller's fsync, then `drop_cached`, finish
    the job.

    `keep_cached`: the file is read again at once (its publish digests and uploads it), so
    its written windows stay in the page cache: dropped, they were read back from the disk
    (for the 12-image fleet, 0.6 core-s of the kernel's time). Writeback is still waited
    for window by window, which keeps the dirty pages few."""

    def __init__(self, out: BinaryIO, *, keep_cached: bool = False) -> None:
        out.flush()
        self._keep = keep_cached
        self._out, self._fd = out, out.fileno()
        self._start = self._pos = self._sent = out.tell()  # _sent: writeback asked up to
        self._sync = _load_sync_file_range()
        self._flushed = self._pos  # the background flush was started with the file this long
        self._flusher: threading.Thread | None = None
        self._flush_error: OSError | None = None

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
        if (self._sync is not None and self._pos - self._flushed >= FLUSH_EVERY
                and not self._flushing()):
            self._flushed = self._pos
            self._flusher = threading.Thread(target=self._flush, name="layerwarm-flush",
                                             daemon=True)
            self._flusher.start()

    def close(self) -> None:
        """Start the rest's writeback without waiting for it: the caller's fsync does,
        then `drop_cached` gives the pages back."""
        try:
            if self._sync is not None and self._pos > self._sent:
                self._range(self._sent, self._pos - self._sent, _WRITE)
                self._sent = self._pos
        finally:
            self._join_flush()
        self._out.seek(self._pos)

    def __enter__(self) -> WriteBehind:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        """`close` when the block succeeded; when it raised, the file is being dropped, once
        the background flush no longer uses its descriptor."""
        if exc_type is None:
            self.close()
        elif self._flusher is not None:
            self._flusher.join()  # its error, if any, matters less than the block's own

    def _flushing(self) -> bool:
        """Whether a background flush still runs (the last one's error is raised here)."""
        if self._flusher is not None and self._flusher.is_alive():
            return True
        self._join_flush()
        return False

    def _flush(self) -> None:
        try:
            os.fdatasync(self._fd)
        except OSError as e:  # raised on the writing thread, by _join_flush
            self._flush_error = e

    def _join_flush(self) -> None:
        if self._flusher is not None:
            self._flusher.join()
            self._flusher = None
        if (e := self._flush_error) is not None:
            self._flush_error = None
            raise _disk_error(e.errno)

    def _drop(self, offset: int, nbytes: int) -> None:
        """Wait until the range is on the disk, then give its clean pages back (unless
        they are kept for a reader to come)."""
        self._range(offset, nbytes, _WRITTEN)
        if self._sync is not None and not self._keep:
            os.posix_fadvise(self._fd, offset, nbytes, os.POSIX_FADV_DONTNEED)

    def _range(self, offset: int, nbytes: int, flags: int) -> None:
        assert self._sync is not None
        if self._sync(self._fd, offset, nbytes, flags) != 0:
            import ctypes  # loaded already, by _load_sync_file_range

            err = ctypes.get_errno()
            if err not in _NOT_A_FILE:
                raise _disk_error(err)
            self._sync = None  # not a file: there is nothing to write back or drop


def _disk_error(err: int) -> OSError:
    """A failure of the writeback or of a flush, as the writer raises it."""
    return OSError(err, f"writing to disk: {os.strerror(err)}")


def drop_cached(fd: int) -> None:
    """Give back the page cache of a file just fsynced: every page is clean, so all go at
    once, without waiting. A descriptor that is not a file has none to give back."""
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except (AttributeError, OSError):  # no fadvise here (not Linux), or not a file
        pass
