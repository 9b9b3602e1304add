"""Readers of a layer blob that end only at its verified end: decompress follows fetch.

Every reader here is a `BlobReader`: after it has returned b"" it gives `verdict()`, the
proof (a `Verified`) that the bytes it returned were the whole blob and matched its
digest. The disk tier's commit takes that proof; nothing else names an entry.
- `VerifyingReader`: a whole staging file, hashed as it is read.

Fetching a layer and then decompressing it leaves the CPU idle during the download and
the network idle during the inflate. Instead, the fetch writes the blob to its staging
file as before, and decompression reads the same file as it grows, waiting at the end for
more. The reader reports end of file only after the fetch has verified the whole blob's
digest, so nothing downstream can commit an entry made from bytes that were not verified.

Two readers, for the two ways the stages run:
- `GrowingFile`: fetch and decompress in one process (the embedded runner); the fetch
  reports each write and its verified end to the reader directly.
- `FollowedFetch`: the fetch runs in another process (a Celery IO worker) and tells the
  reader nothing. The reader polls the `.partial` file's size, and learns that the fetch
  is over by taking the digest's lock, which the fetch holds for as long as it runs. The
  blob is verified when, the lock held, the staging name holds the very file that was read:
  the fetch renames `.partial` to it only after checking the digest.

Reads go through the kernel (pread), so the blob is read back from the page cache: no
disk read, no second buffer of it in memory.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Protocol

from pipeline.digest import Digest, Verified, Verifier
from pipeline.errors import LayerwarmError, NotAFile
from pipeline.nofollow import open_file

if TYPE_CHECKING:
    from pipeline.tiers.disk import DigestLock


class BlobReader(Protocol):
    """Reads a layer blob; `verdict()` after the end is the proof that it was the blob."""

    def read(self, n: int = -1, /) -> bytes: ...
    def verdict(self) -> Verified: ...


class VerifyingReader:
    """A blob in a file, hashed as it is read: its verdict is the hash's."""

    def __init__(self, file: BinaryIO, digest: Digest, size: int) -> None:
        self._file = file
        self._verifier = Verifier(digest, size=size, what="staged layer blob")

    def read(self, n: int = -1) -> bytes:
        data = self._file.read(n)
        self._verifier.update(data)
        return data

    def verdict(self) -> Verified:
        return self._verifier.verify()


class StreamAbandoned(LayerwarmError):
    """The download this reader followed failed or started over; decompress from staging."""


class GrowingFile:
    """Shared between one writer (the fetch) and one reader (the decompression)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._fd: int | None = None
        self._generation = 0  # a new one each time the writer starts the file over
        self._size = 0
        self._verified: Verified | None = None
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

    def finish(self, verified: Verified) -> None:
        """The whole blob is written and its digest verified: the reader may see its end."""
        with self._cond:
            self._verified = verified
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
                if self._verified is not None and self._fd is not None:
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

    def verdict(self) -> Verified:
        """The fetch's own verdict on the blob this reader read to its end."""
        growing = self._growing
        with growing._cond:
            if growing._verified is None or self._pos != growing._verified.size:
                raise StreamAbandoned("the download being followed was not verified")
            return growing._verified


def partial_path(staging: Path) -> Path:
    """Where a fetch writes the blob before it is verified and renamed to `staging`."""
    return staging.with_name(staging.name + ".partial")


class FollowedFetch:
    """Reads a blob that a fetch in another process is writing, as it is written.

    `read(n)` returns at most n bytes as soon as there are any, b"" only at the verified end
    of the blob (hashed here too, as read: `verdict()` is this reader's own proof, not
    the other process's word), and raises `StreamAbandoned` when the fetch ended without leaving the
    file that was read as the verified staging blob (it failed, started over in a new
    file, or its process died). Either way the digest's lock is held afterwards (`lock`):
    the caller commits or decides what comes next under it, then releases it.
    """

    POLL = 0.005       # seconds between looks at a file that is not growing (doubling...)
    POLL_MAX = 0.05    # ... up to this
    PROBE = 0.5        # how long to wait without news before asking whether the fetch runs

    def __init__(self, staging: Path, digest: Digest, size: int, lock: DigestLock,
                 fetch_over: Callable[[], None] = lambda: None) -> None:
        self._staging, self._size, self.lock = staging, size, lock
        self._verifier = Verifier(digest, size=size, what="followed layer blob")
        self._fetch_over = fetch_over
        self.locked = False
        self._fd: int | None = None
        self._pos = 0

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def read(self, n: int = -1) -> bytes:
        idle_since, pause = time.monotonic(), self.POLL
        while True:
            if self._fd is None:
                self._open()
            if self._fd is not None:
                want = self._size - self._pos if n < 0 else min(n, self._size - self._pos)
                data = os.pread(self._fd, want, self._pos) if want > 0 else b""
                if data:
                    self._pos += len(data)
                    self._verifier.update(data)
                    return data
                if self.locked:  # the fetch is over: this file is all there will be
                    if self._pos == self._size and self._is_staged():
                        return b""
                    raise StreamAbandoned(f"the fetch of {self._staging.name} did not end "
                                          "with this file as its verified blob")
                if self._pos == self._size:  # all read: wait for the fetch to verify it
                    self._take_lock(blocking=True)
                    continue
                st = os.fstat(self._fd)
                if st.st_nlink == 0 or st.st_size < self._pos:
                    # Removed or cut short: the fetch gave up on it or started over.
                    self._take_lock(blocking=True)
                    raise StreamAbandoned(f"the fetch of {self._staging.name} started over")
            elif self.locked:
                raise StreamAbandoned(f"no fetch of {self._staging.name} is running")
            if time.monotonic() - idle_since >= self.PROBE:
                # Quiet for a while: a fetch that is no longer running has released the lock.
                self._take_lock(blocking=False)
                idle_since = time.monotonic()
                continue
            time.sleep(pause)
            pause = min(pause * 2, self.POLL_MAX)

    def _open(self) -> None:
        for path in (partial_path(self._staging), self._staging):
            try:
                self._fd = open_file(path)
                return
            except (FileNotFoundError, NotAFile):  # a link is nothing the fetch wrote
                continue

    def verdict(self) -> Verified:
        """After the end: the hash of every byte read, checked against the blob's digest."""
        if not self.locked:
            raise StreamAbandoned(f"the fetch of {self._staging.name} has not ended")
        return self._verifier.verify()

    def wait_for_fetch(self) -> None:
        """Block until the fetch is over, if it was not already; the lock is held after."""
        self._take_lock(blocking=True)

    def _take_lock(self, *, blocking: bool) -> None:
        if not self.locked and self.lock.acquire(blocking=blocking):
            self.locked = True
            self._fetch_over()

    def _is_staged(self) -> bool:
        """Whether the staging name holds the file read (renamed there once verified)."""
        assert self._fd is not None
        try:
            staged = os.lstat(self._staging)
        except FileNotFoundError:
            return False
        ours = os.fstat(self._fd)
        return (staged.st_dev, staged.st_ino) == (ours.st_dev, ours.st_ino) \
            and ours.st_size == self._size
