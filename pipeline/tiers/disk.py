"""The worker-local, content-addressed layer store (tier 1).

    <root>/sha256_<hex>   a verified, decompressed layer tar (the layer digest names it)
    <root>/.staging/      compressed blobs between fetch and decompress
    <root>/.tmp/          files being written; never read as entries; gc sweeps them
    <root>/.locks/        one lock file per digest, locked with flock(2) (and
                          content_sha256_<hex>.lock per diff_id: pipeline/sharing.py)
    <root>/.meta.db       what each entry should be (pipeline/metadata.py)
    <root>/.index/        each entry's file index (pipeline/fileindex.py), derived from it

An entry's name appears only through `Ingest.commit()`, and commit is the gate: it is
shown the proof that the tar hashed to the layer's diff_id (a `Verified`) and where the
bytes came from (an `Origin`: a verified blob of this very digest, the remote tier, or
another entry's content), checks both against the layer and the file's size, and refuses
anything else. Then: fsync, rename, fsync the directory, and record the row with its
origin. A crash at any point leaves nothing or a complete entry.

Nothing here is reached through a link (pipeline/nofollow.py): an entry name that is not
a regular file is no entry (`checked_size` removes it, never its target), a lock file
is opened without following one, a subdirectory that is a link is refused, and temp
files stay 0600 until the verified entry is named (0644: other users read entries).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import sqlite3
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import BinaryIO

from pipeline.digest import Digest, Verified
from pipeline.errors import (
    InvalidDigest,
    NoSpace,
    NotAFile,
    PermanentError,
    UsageError,
    VerificationError,
)
from pipeline.layer import FromBlob, LayerSpec, Origin, Shared, origin_text
from pipeline.metadata import Metadata
from pipeline.metadb import read_only_medium
from pipeline.nofollow import drop_stray, open_file, real_dir, regular
from pipeline.writebehind import drop_cached

log = logging.getLogger("layerwarm")

ENTRY_MODE = 0o644  # entries are read by other users; temp files are 0600 until commit


# Kernel pseudo-filesystems: a directory there may be made, but a file in it never holds
# our bytes (EACCES, EINVAL or silently nothing), so each command would fail its own way.
PSEUDO_FILESYSTEMS = (Path("/proc"), Path("/sys"))


def check_root(root: Path, *, read_only: bool) -> None:
    """Refuse, in one line and before any command reads or writes, a cache dir that
    cannot be one: a regular file (or a path below one), a path in /proc or /sys, or
    (for a command that writes) a read-only mount, which would fail each write its own way,
    or a directory this user may not list (or, to write, create in)."""
    where = "(set --cache-dir or LAYERWARM_CACHE_DIR)"
    real = Path(os.path.realpath(root))
    for pseudo in PSEUDO_FILESYSTEMS:
        if real == pseudo or pseudo in real.parents:
            raise UsageError(f"cache directory {root}: {pseudo} is a kernel pseudo-filesystem "
                             f"that cannot hold the cache {where}")
    existing = next(p for p in (root, *root.parents) if os.path.exists(p))
    if not os.path.isdir(existing):
        raise UsageError(f"cache directory {root}: {existing} is not a directory {where}")
    if not read_only and read_only_medium(existing / ".meta.db"):
        raise PermanentError(f"cache directory {root}: on a read-only filesystem; this command "
                             "writes (ls, inspect, usage, df, metrics and verify --report only "
                             "read and work there)")
    # Readers list the directory; writers also create in it (or create it in `existing`).
    need = os.R_OK | os.X_OK if existing == root else os.X_OK
    if not read_only:
        need |= os.W_OK
    if not os.access(existing, need, effective_ids=os.access in os.supports_effective_ids):
        st = os.stat(existing)
        raise UsageError(
            f"cache directory {root}: permission denied on {existing} (owner uid {st.st_uid}, "
            f"mode {stat.S_IMODE(st.st_mode):04o}; this is uid {os.geteuid()}) {where}")


class DiskTier:
    def __init__(self, root: Path, *, read_only: bool = False) -> None:
        self.root = Path(root)
        check_root(self.root, read_only=read_only)
        self.tmp_dir = self.root / ".tmp"
        self.staging_dir = self.root / ".staging"
        self.locks_dir = self.root / ".locks"
        self.index_dir = self.root / ".index"
        # read_only: commands that only look (ls, df, ...) never move or write .meta.db.
        self.meta = Metadata(self.root / ".meta.db", read_only=read_only,
                             lock=self.locks_dir / "meta.db.lock", rebuild=self._readopt)
        self._ready = False

    def _readopt(self) -> int:
        """Refill a `.meta.db` made anew (the old one was unusable): gc's adoption."""
        from pipeline.gc import adopt  # gc imports this module

        return len(adopt(self, self.entries()))

    def _ensure_dirs(self, sub: Path) -> None:
        """Make the cache directory and its subdirectories; check `sub`, about to be used.

        Made on first write, not on construction, so read-only commands change nothing.
        `sub` is checked on every use: one swapped for a link, even later, is refused
        (and one removed by hand is made again).
        """
        try:
            if not self._ready:
                self.root.mkdir(parents=True, exist_ok=True)
            made = (self.tmp_dir, self.staging_dir, self.locks_dir)
            for d in (sub,) if self._ready else (*made, sub):
                try:
                    os.mkdir(d)
                except FileExistsError:
                    pass  # a directory, or a link: refused when it is used
            self._ready = True
            real_dir(sub)
        except OSError as e:
            raise PermanentError(
                f"cannot create cache directory {e.filename or self.root}: {e.strerror}"
            ) from e

    def drop_cached(self, digest: Digest) -> None:
        """Give back the page cache of the entry (kept by `ingest(keep_cached=True)` for
        its publish); an entry already gone (or not a file) has none."""
        try:
            fd = open_file(self.path(digest), what="cache entry")
        except (FileNotFoundError, NotAFile):
            return
        try:
            drop_cached(fd)
        finally:
            os.close(fd)

    def path(self, digest: Digest) -> Path:
        return self.root / digest.cache_name

    def staging_path(self, digest: Digest) -> Path:
        return self.staging_dir / digest.cache_name

    def staging_file(self, digest: Digest) -> Path:
        """`staging_path`, for a fetch about to write there: `.staging` checked to be a
        directory (not a link to one elsewhere)."""
        self._ensure_dirs(self.staging_dir)
        return self.staging_path(digest)

    def size(self, digest: Digest) -> int | None:
        """Size of the entry, or None when there is none (a link or FIFO is none either)."""
        try:
            st = regular(self.path(digest), "cache entry")
        except NotAFile:
            return None
        return None if st is None else st.st_size

    def checked_size(self, digest: Digest) -> int | None:
        """`size`, after removing a name that is not a regular file (and its row).

        For callers about to trust the entry; they hold the digest's lock.
        """
        if drop_stray(self.path(digest), "cache entry"):
            self.meta.forget(digest)
        return self.size(digest)

    def has(self, digest: Digest) -> bool:
        return self.size(digest) is not None

    def remove(self, digest: Digest) -> bool:
        """Drop an entry (the name: a link's target is not touched), its row and its file
        index.

        A directory under an entry's name is left (nothing here removes a tree). The
        caller holds the digest's lock.
        """
        self.meta.forget(digest)
        with suppress(FileNotFoundError, IsADirectoryError):
            self.index_path(digest).unlink()
        try:
            self.path(digest).unlink()
        except (FileNotFoundError, IsADirectoryError):
            return False
        return True

    # -- file indexes (pipeline/fileindex.py): derived from a verified entry, beside it --

    def index_path(self, digest: Digest) -> Path:
        return self.index_dir / digest.cache_name

    def store_index(self, digest: Digest, data: bytes) -> None:
        """Write the entry's stored file index, whole or not at all (temp file, rename)."""
        self._ensure_dirs(self.index_dir)
        self._ensure_dirs(self.tmp_dir)
        fd, tmp = tempfile.mkstemp(dir=self.tmp_dir, prefix=digest.cache_name + ".",
                                   suffix=".index")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                os.fchmod(f.fileno(), 0o644)  # read by whoever may read the entry
            os.replace(tmp, self.index_path(digest))
        except BaseException:
            with suppress(OSError):
                os.unlink(tmp)
            raise

    def load_index(self, digest: Digest, cap: int) -> bytes | None:
        """The entry's stored file index, or None when it has none (a link, a FIFO or a
        file over `cap` bytes is none either: never followed, never read whole)."""
        try:
            fd = open_file(self.index_path(digest), what="file index")
        except (FileNotFoundError, NotADirectoryError, NotAFile):
            return None
        with open(fd, "rb") as f:
            data = f.read(cap + 1)
        return None if len(data) > cap else data

    def entries(self) -> list[Digest]:
        """Every well-formed entry name in the cache directory that is a regular file."""
        return [d for d, is_file in self._names() if is_file]

    def strays(self) -> list[Digest]:
        """Entry names that are not regular files (links, FIFOs...): no entries, to remove."""
        return [d for d, is_file in self._names() if not is_file]

    def _names(self) -> list[tuple[Digest, bool]]:
        try:
            items = sorted(os.scandir(self.root), key=lambda i: i.name)
        except (FileNotFoundError, NotADirectoryError):
            return []
        out = []
        for item in items:
            try:
                digest = Digest.parse(item.name, allow_cache_name=True)
                is_file = item.is_file(follow_symlinks=False)
            except InvalidDigest:
                continue  # not ours (or hostile): never touched
            except FileNotFoundError:
                continue  # removed while we looked
            if digest.cache_name == item.name:
                out.append((digest, is_file))
        return out

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
        self._ensure_dirs(self.locks_dir)
        return DigestLock(self.locks_dir / f"{digest.cache_name}.lock")

    @contextmanager
    def ingest(self, digest: Digest, *, keep_cached: bool = False) -> Iterator[Ingest]:
        """A temp file that becomes the entry for `digest` only if `commit()` is called;
        `keep_cached`: the commit leaves its pages in the page cache, for a reader to
        come (a publish), who gives them back (`drop_cached`)."""
        self._ensure_dirs(self.tmp_dir)
        # mkstemp: O_EXCL, O_NOFOLLOW and 0600, so unverified bytes are no one else's to
        # read; `Ingest.commit` widens the verified entry to `Ingest.mode`.
        fd, name = tempfile.mkstemp(prefix=f"{digest.cache_name}.", dir=self.tmp_dir)
        ingest = Ingest(self, digest, Path(name), os.fdopen(fd, "wb"), keep_cached)
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
        self._ensure_dirs(self.tmp_dir)  # the root must exist to be asked
        st = os.statvfs(self.root)
        free = st.f_bavail * st.f_frsize
        if size > free:
            raise NoSpace(f"no space left on {self.root}: {what} needs {size} bytes, {free} free")


class Ingest:
    def __init__(self, tier: DiskTier, digest: Digest, path: Path, file: BinaryIO,
                 keep_cached: bool = False) -> None:
        self.tier, self.digest, self.path, self.file = tier, digest, path, file
        self.keep_cached = keep_cached
        self.committed = False
        # The entry's mode: entries are read by other users (containerd, CI jobs). None
        # leaves the file's own mode (a hard link shares its source's inode and mode).
        self.mode: int | None = ENTRY_MODE

    def commit(self, layer: LayerSpec, tar: Verified, origin: Origin) -> Path:
        """Make the temp file the entry for `layer`, if the proofs hold; else raise.

        `tar` must be the layer's diff_id and the file's size; a `FromBlob` origin must be
        this digest's own blob. Then fsync, rename, fsync the directory, record the row.
        """
        self._check(layer, tar, origin)
        if self.file.closed:  # replaced by a hard link (pipeline/sharing.py): open it
            self.file = open(open_file(self.path, what="temp file"), "rb")
        self.file.flush()
        if self.mode is not None:
            os.fchmod(self.file.fileno(), self.mode)
        os.fsync(self.file.fileno())
        if not self.keep_cached:  # on disk now: out of the page cache, as it was written
            drop_cached(self.file.fileno())
        self.file.close()
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
        fd = self._open()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return False
            raise
        self._fd = fd
        return True

    def _open(self) -> int:
        try:
            # A lock taken through a link would lock (or create) a file elsewhere, and no
            # layerwarm process locks through one: a link here is nobody's lock.
            drop_stray(self.path, "lock file")
            return open_file(self.path, os.O_RDWR | os.O_CREAT, 0o644, what="lock file")
        except OSError as e:
            if e.errno == errno.EROFS and os.path.lexists(self.path):
                # A read-only mount of the cache (readers such as `verify --report`): an
                # flock needs no write access, and still excludes writers on other mounts.
                try:
                    return open_file(self.path, os.O_RDONLY, what="lock file")
                except OSError:
                    pass
            raise PermanentError(
                f"cannot open lock file {self.path}: {e.strerror}; make {self.path.parent} "
                "writable (layerwarm locks a layer to read or change it)") from None

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
