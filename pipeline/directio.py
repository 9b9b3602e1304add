"""Write a new file's bytes past the page cache (O_DIRECT), where the file system allows it.

A buffered write copies every byte into page-cache pages the kernel allocates for it, and
those pages were most of a cold warm's kernel time (measured: docs/ARCHITECTURE.md, "One
layer, embedded"). A layer being prewarmed is also not something anyone reads yet:
writing it past the cache leaves the node's hot pages where they are, as backup tools do.

O_DIRECT wants the memory, the file offset and the length of each write aligned to the
device's block, so the bytes are gathered in an aligned buffer (anonymous mmap memory is
page-aligned) and written whole blocks at a time, about a MiB per write; the unaligned
tail, at `close`, goes through the page cache. Where the file system refuses O_DIRECT
(the fcntl, or the first write, fails with EINVAL), the same bytes are written buffered:
slower, never wrong. The caller's fsync makes either durable; written buffered, the
pages are sent to the disk as they fill (`start_writeback`) so that fsync has little left.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import mmap
import os
from collections.abc import Callable
from types import TracebackType
from typing import BinaryIO

BLOCK = 4096  # covers devices with 512-byte and 4 KiB logical blocks
BUFFER = 4 << 20  # room for a chunk of output (1 MiB) on top of what waits to be written
WRITE_AT = 1 << 20  # write out once this much is gathered: output shows as it is made

SYNC_EVERY = 32 << 20  # start writeback as we go, so the final fsync has little left
_SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start writeback of dirty pages, do not wait


# Looked up at the first writeback, not at import: a warm whose layers are all on disk
# writes nothing. From the symbols the process already has (dlopen(NULL): the C library
# is loaded in every CPython), not by `ctypes.util.find_library("c")`, which imports
# subprocess and runs `ldconfig -p` in a child: ~20 ms on the write thread, in the middle
# of a cold warm's first layer, while the decompressor waited on the full queue.
@functools.cache
def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    import ctypes

    try:
        call = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):  # not Linux/glibc: fall back to fdatasync
        return None
    call.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    call.restype = ctypes.c_int
    return call


def preload() -> None:
    """Look up sync_file_range now (see `_load_sync_file_range`), for a long-running worker."""
    _load_sync_file_range()


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to start writing ``nbytes`` at ``offset`` to disk, without waiting.

    The entry's final fsync then finds most pages already clean, so writing the disk
    overlaps with producing the data instead of following it.
    """
    sync_file_range = _load_sync_file_range()
    if sync_file_range is None:
        os.fdatasync(fd)  # no async writeback here: a blocking sync at least bounds the tail
    elif sync_file_range(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE) != 0:
        import ctypes  # loaded already, by _load_sync_file_range

        err = ctypes.get_errno()
        if err not in (errno.ESPIPE, errno.EINVAL):  # a pipe or device: nothing to write back
            raise OSError(err, os.strerror(err))


class DirectWriter:
    """Appends to `out` from its current offset; `close` writes what is left and leaves
    `out` positioned at the end. `direct_bytes`: how many went past the page cache (none
    for a file under WRITE_AT)."""

    def __init__(self, out: BinaryIO) -> None:
        out.flush()
        self._out, self._fd, self._pos = out, out.fileno(), out.tell()
        self._flags = fcntl.fcntl(self._fd, fcntl.F_GETFL)
        # O_DIRECT goes on at the first full write: a file smaller than that is written
        # buffered, in one write at `close`, where a direct write's wait for the device
        # would cost more than the copy it saves.
        self._direct, self._may_go_direct = False, self._pos % BLOCK == 0
        self.direct_bytes = 0
        self._unsynced = 0  # written buffered since the last start_writeback
        self._buf = mmap.mmap(-1, BUFFER)
        self._view = memoryview(self._buf)
        self._fill = 0

    def _set_direct(self, on: bool) -> bool:
        o_direct = getattr(os, "O_DIRECT", 0)
        if not o_direct:
            return False  # not Linux: buffered, as before
        try:
            fcntl.fcntl(self._fd, fcntl.F_SETFL,
                        self._flags | o_direct if on else self._flags & ~o_direct)
        except OSError as e:
            if on and e.errno == errno.EINVAL:  # this file system has no O_DIRECT
                return False
            raise
        return on

    def write(self, chunk: bytes | memoryview) -> None:
        data = memoryview(chunk)
        while data:
            n = min(len(data), BUFFER - self._fill)
            self._view[self._fill:self._fill + n] = data[:n]
            self._fill += n
            data = data[n:]
            if self._fill >= WRITE_AT:
                if self._may_go_direct:
                    self._may_go_direct = False
                    self._direct = self._set_direct(True)
                self._write_out(self._fill - self._fill % BLOCK)

    def close(self) -> None:
        """Write what is buffered: its aligned part directly if the file went direct, the
        rest (or all of a small file) buffered."""
        try:
            if self._direct:
                aligned = self._fill - self._fill % BLOCK
                if aligned:
                    self._write_out(aligned)
                self._direct = self._set_direct(False)  # the tail cannot be aligned
            if self._fill:
                self._write_out(self._fill)
            self._out.seek(self._pos)
        finally:
            self._release()

    def abort(self) -> None:
        """Give the buffer back without writing it (the write failed; the file is dropped)."""
        try:
            if self._direct:
                self._direct = self._set_direct(False)
        finally:
            self._release()

    def __enter__(self) -> DirectWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        """`close` when the block succeeded, `abort` when it raised."""
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _release(self) -> None:
        if not self._buf.closed:
            self._view.release()
            self._buf.close()

    def _write_out(self, n: int) -> None:
        """Write the first `n` buffered bytes at the file's end; keep the rest buffered."""
        done = 0
        while done < n:
            try:
                wrote = os.pwrite(self._fd, self._view[done:n], self._pos + done)
            except OSError as e:
                # Refused only at the first write on some file systems: go on buffered.
                if not (self._direct and e.errno == errno.EINVAL):
                    raise
                self._direct = self._set_direct(False)
                continue
            done += wrote
            if self._direct:
                self.direct_bytes += wrote
                if done % BLOCK:  # a short write left us unaligned: the rest buffered
                    self._direct = self._set_direct(False)
            else:
                self._unsynced += wrote
        if self._unsynced >= SYNC_EVERY:
            start_writeback(self._fd, self._pos + n - self._unsynced, self._unsynced)
            self._unsynced = 0
        self._pos += n
        left = self._fill - n
        if left:
            self._view[:left] = self._view[n:self._fill]
        self._fill = left
