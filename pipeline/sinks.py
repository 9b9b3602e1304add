"""Hash and write a stream of chunks on their own threads, while the caller produces more.

Decompressing, hashing and writing a layer one after another leaves two of them idle at
any moment; ISA-L inflate, hashlib and file writes all release the GIL, so running them
on three threads makes the slowest one the limit instead of their sum. Queues are
bounded, so memory stays flat whatever the layer's size.
"""

from __future__ import annotations

import errno
import functools
import os
import queue
import threading
from collections.abc import Callable
from typing import BinaryIO

from pipeline.digest import Verifier

_DONE = object()
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


class _Stage:
    def __init__(self, name: str, work: Callable[[bytes], None], depth: int) -> None:
        self.queue: queue.Queue[object] = queue.Queue(depth)
        self.error: BaseException | None = None
        self._work = work
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (item := self.queue.get()) is not _DONE:
            if self.error is None:
                try:
                    self._work(item)  # type: ignore[arg-type]
                except BaseException as e:  # handed to the producer, raised there
                    self.error = e


class HashingWriter:
    """`put(chunk)` hashes into `verifier` and writes to `out`, each on its own thread."""

    def __init__(self, out: BinaryIO, verifier: Verifier, depth: int = 16) -> None:
        self._out, self._unsynced, self._offset = out, 0, out.tell()
        self._stages = [
            _Stage("layerwarm-hash", verifier.update, depth),
            _Stage("layerwarm-write", self._write, depth),
        ]

    def _write(self, chunk: bytes) -> None:
        self._out.write(chunk)
        self._unsynced += len(chunk)
        if self._unsynced >= SYNC_EVERY:
            self._out.flush()
            start_writeback(self._out.fileno(), self._offset, self._unsynced)
            self._offset += self._unsynced
            self._unsynced = 0

    def put(self, chunk: bytes) -> None:
        self._raise()
        for stage in self._stages:
            stage.queue.put(chunk)

    def close(self) -> None:
        """Wait for both threads to finish; raise what either of them raised."""
        for stage in self._stages:
            stage.queue.put(_DONE)
        for stage in self._stages:
            stage.thread.join()
        self._raise()

    def _raise(self) -> None:
        for stage in self._stages:
            if stage.error is not None:
                raise stage.error


class InlineWriter:
    """`HashingWriter`'s interface without its threads, for small layers: starting and
    joining two threads cost more than hashing and writing a few hundred KiB here."""

    def __init__(self, out: BinaryIO, verifier: Verifier) -> None:
        self._out, self._verifier = out, verifier

    def put(self, chunk: bytes) -> None:
        self._verifier.update(chunk)
        self._out.write(chunk)

    def close(self) -> None:
        pass
