"""The worker-local, content-addressed layer store (tier 1).

    <root>/sha256_<hex>   a verified, decompressed layer tar (the layer digest names it)
    <root>/.staging/      compressed blobs between fetch and decompress
    <root>/.tmp/          files being written; never read as entries; gc sweeps them
    <root>/.locks/        one lock file per digest, locked with flock(2) (and
                          content_sha256_<hex>.lock per diff_id: pipeline/sharing.py)
    <root>/.meta.db       what each entry should be (pipeline/metadata.py)

An entry's name appears only through `Ingest.commit()`, and commit is the gate: it is
shown the proof that the tar hashed to the layer's diff_id (a `Verified`) and where the
bytes came from (an `Origin`: a verified blob of this very digest, the remote tier, or
another entry's content), checks both against the layer and the file's size, and refuses
anything else. Then: fsync, rename, fsync the directory, and record the row with its
origin. A crash at any point leaves nothing or a complete entry.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import sqlite3
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from pipeline.digest import Digest, Verified
from pipeline.errors import InvalidDigest, NoSpace, PermanentError, VerificationError
from pipeline.layer import FromBlob, LayerSpec, Origin, Shared, origin_text
from pipeline.metadata import Metadata

log = logging.getLogger("layerwarm")


class DiskTier:
    def __init__(self, root: Path, *, read_only: bool = False) -> None:
        self.root = Path(root)
        self.tmp_dir = self.root / ".tmp"
        self.staging_dir = self.root / ".staging"
        self.locks_dir = self.root / ".locks"
        # read_only: commands that only look (ls, df, ...) never move or write .meta.db.
        self.meta = Metadata(self.root / ".meta.db", read_only=read_only,
                             lock=self.locks_dir / "meta.db.lock", rebuild=self._readopt)
        self._ready = False

    def _readopt(self) -> int:
        """Refill a `.meta.db` made anew (the old one was unusable): gc's adoption."""
        from pipeline.gc import adopt  # gc imports this module

        return len(adopt(self, self.entries()))

    def _ensure_dirs(self) -> None:
        # Made on first write, not on construction, so read-only commands change nothing.
        if self._ready:
            return
        try:
            for d in (self.root, self.tmp_dir, self.staging_dir, self.locks_dir):
                d.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise PermanentError(f"cannot create cache directory {self.root}: {e.strerror}") from e
        self._ready = True

    def path(self, digest: Digest) -> Path:
        return self.root / digest.cache_name

    def staging_path(self, digest: Digest) -> Path:
        return self.staging_dir / digest.cache_name

    def size(self, digest: Digest) -> int | None:
        """Size of the entry, or None when there is none."""
        try:
            return self.path(digest).stat().st_size
        except FileNotFoundError:
            return None

    def has(self, digest: Digest) -> bool:
        return self.size(digest) is not None

    def remove(self, digest: Digest) -> bool:
        """Drop an entry and its row; the caller holds the digest's lock."""
        self.meta.forget(digest)
        try:
            self.path(digest).unlink()
        except FileNotFoundError:
            return False
        return True

    def entries(self) -> list[Digest]:
        """Every well-formed entry name in the cache directory."""
        if not self.root.is_dir():
            return []
        out = []
        for p in sorted(self.root.iterdir()):
            try:
                out.append(Digest.parse(p.name, allow_cache_name=True))
            except InvalidDigest:
                continue  # not ours (or hostile): never touched
        return [d for d in out if d.cache_name == self.path(d).name and self.path(d).is_file()]

    @contextmanager
    def space_guard(self) -> Iterator[None]:
        """Turn ENOSPC from writes into the cache into one clear error naming the cache."""
        try:
            yield
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise NoSpace(f"no space left on {self.root}") from e
            raise

    def lock(self, digest: Digest) -> DigestLock:
        """An exclusive, cross-process lock for materializing one digest on this host."""
        self._ensure_dirs()
        return DigestLock(self.locks_dir / f"{digest.cache_name}.lock")

    @contextmanager
    def ingest(self, digest: Digest) -> Iterator[Ingest]:
        """A temp file that becomes the entry for `digest` only if `commit()` is called."""
        self._ensure_dirs()
        fd, name = tempfile.mkstemp(prefix=f"{digest.cache_name}.", dir=self.tmp_dir)
        os.fchmod(fd, 0o644)  # entries are read by other users (containerd, CI jobs)
        ingest = Ingest(self, digest, Path(name), os.fdopen(fd, "wb"))
        try:
            yield ingest
        finally:
            ingest.file.close()
            if not ingest.committed:
                Path(name).unlink(missing_ok=True)

    def ensure_room(self, size: int, what: str) -> None:
        """Raise NoSpace unless the cache's filesystem has `size` bytes free for `what`.

        Asked before a download or a restore writes anything, so bytes that cannot fit
        fail at once (or, from the remote tier, fall back to the registry) instead of
        filling the disk first. Others write meanwhile: `space_guard` still catches ENOSPC.
        """
        self._ensure_dirs()
        st = os.statvfs(self.root)
        free = st.f_bavail * st.f_frsize
        if size > free:
            raise NoSpace(f"no space left on {self.root}: {what} needs {size} bytes, {free} free")


class Ingest:
    def __init__(self, tier: DiskTier, digest: Digest, path: Path, file: BinaryIO) -> None:
        self.tier, self.digest, self.path, self.file = tier, digest, path, file
        self.committed = False

    def commit(self, layer: LayerSpec, tar: Verified, origin: Origin) -> Path:
        """Make the temp file the entry for `layer`, if the proofs hold; else raise.

        `tar` must be the layer's diff_id and the file's size; a `FromBlob` origin must be
        this digest's own blob. Then fsync, rename, fsync the directory, record the row.
        """
        self._check(layer, tar, origin)
        if not self.file.closed:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
        else:
            with open(self.path, "rb") as f:
                os.fsync(f.fileno())
        target = self.tier.path(self.digest)
        os.replace(self.path, target)
        self.committed = True
        dir_fd = os.open(self.tier.root, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        try:  # the entry is verified and named; a metadata hiccup must not undo that
            self.tier.meta.record_layer(layer.digest, layer.diff_id, layer.media_type,
                                        layer.size, tar.size, origin_text(origin))
        except sqlite3.Error as e:
            log.warning("could not record %s in %s: %s", layer.digest, self.tier.meta.path, e)
        return target

    def _check(self, layer: LayerSpec, tar: Verified, origin: Origin) -> None:
        what = f"layer {layer.digest}"
        if layer.digest != self.digest:
            raise VerificationError(f"{what}: commit into the ingest of {self.digest}")
        if tar.digest != layer.diff_id:
            raise VerificationError(f"{what}: content is {tar.digest}, not diff_id {layer.diff_id}")
        if isinstance(origin, FromBlob) and origin.blob.digest != layer.digest:
            raise VerificationError(f"{what}: made from blob {origin.blob.digest}")
        if isinstance(origin, Shared) and origin.source == layer.digest:
            raise VerificationError(f"{what}: shared from itself")
        if not self.file.closed:
            self.file.flush()
            size = os.fstat(self.file.fileno()).st_size
        else:
            size = os.stat(self.path, follow_symlinks=False).st_size
        if size != tar.size:
            raise VerificationError(f"{what}: {size} bytes written, {tar.size} verified")


class DigestLock:
    """flock(2) on a per-digest file: held by this open file, released on close or exit."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self, blocking: bool = True) -> bool:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return False
            raise
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self) -> DigestLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
