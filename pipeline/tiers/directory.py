"""The remote tier as a plain directory, e.g. an NFS mount shared by every worker.

Layout (entries sit directly under the root so `ls` lists layers by digest):

    <root>/sha256_<hex>              the decompressed layer tar
    <root>/.meta/sha256_<hex>.json   its metadata, {"diff-id": ..., ...}
    <root>/.index/sha256_<hex>       its file index (pipeline/fileindex.py)
    <root>/.tmp/                     files being written; never read; safe to sweep

An upload copies into `.tmp/`, fsyncs, writes the sidecar, then renames the entry into
place: rename within one filesystem is atomic (also on NFS), so readers on any host see
either no entry or a complete one. Temp files left by a crash are only ever in `.tmp/`.

Anyone who can write to the share can plant anything under these names, so nothing is
followed: an entry or sidecar that is not a regular file (a symlink to a private file or
to /dev/zero, a FIFO) is refused with a VerificationError naming it, which the pipeline
takes as "not this layer" and replaces; a sidecar is read only up to a cap; `.tmp` and
`.meta` are used only when they are real directories, never written through as links.
A rename replaces a planted link itself, never its target.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TypeVar

from pipeline.digest import Digest
from pipeline.errors import (
    LayerwarmError,
    NotAFile,
    NotFound,
    RemoteTierUnavailable,
    Unauthorized,
    UsageError,
    VerificationError,
)
from pipeline.nofollow import file_kind, open_file, regular
from pipeline.tiers.base import Progress, RemoteEntry, checked_metadata, entry_name

log = logging.getLogger(__name__)

# Layers are tens to hundreds of MiB: big buffers keep syscalls (and NFS round trips) few.
_CHUNK = 4 * 1024 * 1024
# A sidecar is a few hundred bytes of JSON; one this big is not ours, and is not read whole.
SIDECAR_CAP = 64 * 1024

T = TypeVar("T")


def _pump(
    readinto: Callable[[memoryview], int | None],
    write: Callable[[memoryview], object],
    progress: Progress | None,
) -> int:
    """Copy until EOF through one reusable buffer; returns the bytes copied."""
    view = memoryview(bytearray(_CHUNK))
    total = 0
    while n := readinto(view):
        write(view[:n])
        total += n
        if progress is not None:
            progress(n)
    return total


def _fsync_dir(path: Path) -> None:
    # Makes the rename itself durable. Some filesystems refuse fsync on a directory;
    # the rename is still atomic there, so that refusal is not an error.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class DirectoryTier:
    """A `RemoteTier` on a local or network filesystem directory."""

    def __init__(self, root: Path | str) -> None:
        root = Path(root)
        if not root.is_absolute():
            raise UsageError(f"remote tier directory must be an absolute path, got {str(root)!r}")
        self.root = root
        self.url = root.as_uri()
        self._tmp = root / ".tmp"
        self._meta = root / ".meta"
        self._index = root / ".index"
        self._ready = False
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"DirectoryTier({self.url!r})"

    # -- the RemoteTier protocol -------------------------------------------------------

    def connect(self) -> None:
        self._ensure_root()

    def stat(self, digest: Digest) -> RemoteEntry | None:
        self._ensure_root()
        st = self._regular(self.root / digest.cache_name, f"stat {digest}")
        if st is None:
            return None
        return RemoteEntry(digest, st.st_size, self._read_sidecar(digest))

    def download(self, digest: Digest, dest: Path, progress: Progress | None = None) -> RemoteEntry:
        what = f"download {digest}"
        with open(self._open_entry(digest, what), "rb") as fsrc:
            metadata = self._read_sidecar(digest)
            # Errors writing `dest` are the local disk's (e.g. ENOSPC) and stay OSError;
            # only reading the share is translated into remote-tier errors.
            with open(dest, "wb") as fdst:
                size = _pump(lambda buf: self._call(what, fsrc.readinto, buf), fdst.write, progress)
        return RemoteEntry(digest, size, metadata)

    def stream(self, digest: Digest, write: Callable[[bytes | memoryview], object],
               progress: Progress | None = None) -> int:
        what = f"download {digest}"
        with open(self._open_entry(digest, what), "rb") as fsrc:
            return _pump(lambda buf: self._call(what, fsrc.readinto, buf), write, progress)

    def read_range(self, digest: Digest, offset: int, length: int) -> bytes:
        what = f"read {digest}"
        fd = self._open_entry(digest, what)
        try:
            return self._call(what, os.pread, fd, length, offset)
        finally:
            os.close(fd)

    def _open_entry(self, digest: Digest, what: str) -> int:
        """A descriptor of the entry, a regular file (`_open_regular`); NotFound if absent."""
        self._ensure_root()
        fd = self._open_regular(self.root / digest.cache_name, what)
        if fd is None:
            raise NotFound(f"remote tier {self.url}: no layer {digest}")
        return fd

    def put_index(self, digest: Digest, data: bytes) -> None:
        name, what = digest.cache_name, f"upload the file index of {digest}"
        self._ensure_root()
        with self._errors(what):
            self._subdir(self._tmp, create=True)
            self._subdir(self._index, create=True)
            fd, tmp = tempfile.mkstemp(dir=self._tmp, prefix=name + ".", suffix=".index.part")
            try:
                # Not fsynced, unlike a layer: an index is derived data, and one a crash
                # left empty or torn is refused (BadIndex) and made again by its next
                # reader. The fsync was a second one per published layer.
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.replace(tmp, self._index / name)
            except BaseException:
                with suppress(OSError):
                    os.unlink(tmp)
                raise

    def get_index(self, digest: Digest, cap: int) -> bytes | None:
        what = f"read the file index of {digest}"
        self._ensure_root()
        if not self._subdir(self._index, create=False):
            return None
        fd = self._open_regular(self._index / digest.cache_name, what)
        if fd is None:
            return None
        with open(fd, "rb") as f:
            data = self._call(what, f.read, cap + 1)
        return None if len(data) > cap else data

    def upload(
        self,
        digest: Digest,
        src: Path,
        metadata: Mapping[str, str],
        progress: Progress | None = None,
    ) -> None:
        meta = checked_metadata(self.url, metadata)
        name = digest.cache_name
        what = f"upload {digest}"
        self._ensure_root()
        with open(src, "rb") as fsrc:  # a missing `src` is the caller's bug: plain OSError
            with self._errors(what):
                self._subdir(self._tmp, create=True)  # re-made each time: gc may sweep .tmp
                self._subdir(self._meta, create=True)
                fd, tmp = tempfile.mkstemp(dir=self._tmp, prefix=name + ".", suffix=".part")
                try:
                    with os.fdopen(fd, "wb") as fdst:
                        _pump(fsrc.readinto, fdst.write, progress)
                        fdst.flush()
                        os.fsync(fdst.fileno())
                    # The sidecar goes first, so a visible entry always has its metadata.
                    self._write_sidecar(name, meta)
                    os.replace(tmp, self.root / name)
                except BaseException:
                    with suppress(OSError):
                        os.unlink(tmp)
                    raise
                _fsync_dir(self.root)

    def delete(self, digest: Digest) -> bool:
        self._ensure_root()
        name = digest.cache_name
        with self._errors(f"delete {digest}"):
            try:
                os.unlink(self.root / name)
                existed = True
            except FileNotFoundError:
                existed = False
            # Entry first, then sidecar: a crash in between leaves only an orphan sidecar,
            # which no reader trusts without its entry. (unlink never follows a link.)
            if self._subdir(self._meta, create=False):
                with suppress(FileNotFoundError):
                    os.unlink(self._meta / f"{name}.json")
            if self._subdir(self._index, create=False):
                with suppress(FileNotFoundError):
                    os.unlink(self._index / name)
        return existed

    def list(self) -> Iterator[RemoteEntry]:
        self._ensure_root()
        with self._errors("list"), os.scandir(self.root) as it:
            found = [(d, e) for e in it if (d := entry_name(e.name)) is not None]
        for digest, dirent in found:
            try:
                st = dirent.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # deleted since the scan
            except OSError as exc:
                raise self._translate(exc, "list") from exc
            if stat.S_ISREG(st.st_mode):
                yield RemoteEntry(digest, st.st_size, {}, st.st_mtime)

    # -- helpers ----------------------------------------------------------------------

    def _ensure_root(self) -> None:
        """Create the root (one level only) the first time it is needed.

        Only the last component is created: if the parent is missing, the share is most
        likely not mounted, and creating it would silently cache onto the local disk.
        """
        if self._ready:
            return
        with self._lock:
            if self._ready:
                return
            try:
                if not self.root.is_dir():
                    # exist_ok: another worker may create it at the same moment.
                    self.root.mkdir(exist_ok=True)
            except FileNotFoundError:
                raise UsageError(
                    f"remote tier {self.url}: parent directory {self.root.parent} does not "
                    "exist (is the share mounted?)"
                ) from None
            except FileExistsError:
                raise UsageError(f"remote tier {self.url}: not a directory") from None
            except OSError as exc:
                raise self._translate(exc, "create root") from exc
            self._ready = True

    def _read_sidecar(self, digest: Digest) -> dict[str, str]:
        """The entry's metadata: {} when it has none (or it is not JSON), refused
        (VerificationError) when the sidecar is not a regular file of at most SIDECAR_CAP."""
        path = self._meta / f"{digest.cache_name}.json"
        what = f"read metadata of {digest}"
        with self._errors(what):
            fd = self._open_regular(path, what) if self._subdir(self._meta) else None
        if fd is None:
            return {}
        with open(fd, "rb") as f:
            data = self._call(what, f.read, SIDECAR_CAP + 1)
        if len(data) > SIDECAR_CAP:
            raise VerificationError(
                f"remote tier {self.url}: {path} has more than {SIDECAR_CAP} bytes, "
                "too many for metadata: refused")
        try:
            parsed = json.loads(data)
        except (ValueError, RecursionError):
            # The pipeline takes an entry without its metadata for no layer at all; the
            # bytes are still the tier's to keep or replace.
            log.warning("remote tier %s: ignoring unreadable metadata %s", self.url, path)
            return {}
        if not isinstance(parsed, dict):
            return {}
        return {k: v for k, v in parsed.items() if isinstance(k, str) and isinstance(v, str)}

    def _regular(self, path: Path, what: str) -> os.stat_result | None:
        """lstat of `path` if it is a regular file; None if absent; else refused."""
        with self._errors(what), self._refusing():
            return regular(path, "object")

    def _open_regular(self, path: Path, what: str) -> int | None:
        """A read-only descriptor of `path` if it is a regular file; None if absent.

        Anything else is refused (VerificationError naming it): a link is never followed
        (to a private file, to /dev/zero) and a FIFO never waited on. The lstat keeps us
        from opening a device at all; `open_file` catches a swap in between.
        """
        if self._regular(path, what) is None:
            return None
        with self._errors(what), self._refusing():
            try:
                return open_file(path, what="object")
            except FileNotFoundError:
                return None

    @contextmanager
    def _refusing(self) -> Iterator[None]:
        """NotAFile from the share as the tier's refusal: a corrupt object, not a failure."""
        try:
            yield
        except NotAFile as e:
            raise VerificationError(f"remote tier {self.url}: {e}: refused") from None

    def _subdir(self, path: Path, *, create: bool = False) -> bool:
        """Whether `path` (.tmp or .meta) is a real directory, made first if `create`;
        anything else there (a planted link) is refused, so nothing goes through it."""
        with self._errors(f"open {path.name}"):
            if create:
                with suppress(FileExistsError):
                    path.mkdir()
            try:
                mode = os.lstat(path).st_mode
            except FileNotFoundError:
                return False
        if not stat.S_ISDIR(mode):
            raise self._refused(path, file_kind(mode), "a directory")
        return True

    def _refused(self, path: Path, kind: str, wanted: str) -> VerificationError:
        return VerificationError(
            f"remote tier {self.url}: {path} is {kind}, not {wanted}: refused")

    def _write_sidecar(self, name: str, meta: dict[str, str]) -> None:
        fd, tmp = tempfile.mkstemp(dir=self._tmp, prefix=name + ".", suffix=".json.part")
        try:
            with os.fdopen(fd, "w", encoding="ascii") as f:
                json.dump(meta, f, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._meta / f"{name}.json")
        except BaseException:
            with suppress(OSError):
                os.unlink(tmp)
            raise

    def _translate(self, exc: OSError, what: str) -> LayerwarmError:
        if isinstance(exc, PermissionError):
            return Unauthorized(f"remote tier {self.url}: {what}: permission denied")
        # Everything else (EIO, ESTALE, ETIMEDOUT on NFS, ENOSPC on the share) may pass.
        return RemoteTierUnavailable(f"remote tier {self.url}: {what}: {exc.strerror or exc}")

    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except LayerwarmError:
            raise
        except OSError as exc:
            raise self._translate(exc, what) from exc

    def _call(self, what: str, fn: Callable[..., T], *args: object) -> T:
        try:
            return fn(*args)
        except OSError as exc:
            raise self._translate(exc, what) from exc
