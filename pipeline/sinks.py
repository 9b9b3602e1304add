"""Hash and write a stream of chunks on their own threads, while the caller produces more.

Decompressing, hashing and writing a layer one after another leaves two of them idle at
any moment; ISA-L inflate, hashlib and file writes all release the GIL, so running them
on three threads makes the slowest one the limit instead of their sum. Queues are
bounded, so memory stays flat whatever the layer's size.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import BinaryIO

from pipeline.digest import Verifier
from pipeline.writebehind import WriteBehind

_DONE = object()


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
    """`put(chunk)` hashes into `verifier` and writes to `out`, each on its own thread.

    The file is written to disk as it grows and left out of the page cache unless
    `keep_cached` (pipeline/writebehind.py)."""

    def __init__(self, out: BinaryIO, verifier: Verifier, depth: int = 16, *,
                 keep_cached: bool = False) -> None:
        self._file = WriteBehind(out, keep_cached=keep_cached)
        self._stages = [
            _Stage("layerwarm-hash", verifier.update, depth),
            _Stage("layerwarm-write", self._file.write, depth),
        ]

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
        with self._file:  # the rest written out, unless either thread failed
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
