"""Sharing by content: satisfy a layer from an entry with the same diff_id (issue 6, item 3).

The same tar compressed with gzip and with zstd (or recompressed by a build tool) has two
layer digests and one diff_id. When a layer is to be materialized and `.meta.db` records an
entry on disk with its diff_id under another digest, the new name becomes a hard link to
that file: no registry fetch, no second copy. Where a link is impossible (EXDEV, EMLINK,
EPERM, ...) a reflink is tried, then a copy that is hashed while it is made.

The new name still appears only through `Ingest.commit()`: the link is made in `.tmp/`,
hashed against the diff_id, then renamed to `sha256_<hex>`, while the new digest's lock
(held by the caller) and the source digest's lock (taken here) are both held. The entry is
recorded as `Shared`: the image config's word pairs this digest with the content, not a
verified blob, so it serves images that say the same and is never published
(pipeline/chain.py).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import sqlite3
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pipeline.digest import CHUNK, Digest, Verified, Verifier, hash_file
from pipeline.errors import NotAFile, VerificationError
from pipeline.layer import LayerSpec, Shared
from pipeline.metadata import LayerRecord
from pipeline.nofollow import open_file, regular
from pipeline.tiers.disk import ENTRY_MODE, DigestLock, DiskTier, Ingest

log = logging.getLogger("layerwarm")

How = Literal["hardlink", "reflink", "copy"]
FICLONE = 0x40049409  # linux/fs.h _IOW(0x94, 9, int); the fcntl module has no name for it
# A link can be refused by the filesystem rather than by our mistake: fall back to a copy.
LINK_REFUSED = frozenset(
    {errno.EXDEV, errno.EMLINK, errno.EPERM, errno.EACCES, errno.EOPNOTSUPP, errno.ENOTSUP}
)
# We already hold the new digest's lock, so the source's lock is only tried for this long
# (never waited on without bound: two warms each holding one of the pair cannot deadlock).
SOURCE_LOCK_WAIT = 5.0


@dataclass(frozen=True)
class Linked:
    """How a layer was satisfied from another entry with its diff_id."""

    source: Digest  # the entry it shares content with
    how: How
    size: int


def candidates(disk: DiskTier, digest: Digest, diff_id: Digest) -> list[LayerRecord]:
    """Entries on disk with `diff_id` under another digest, at their recorded size."""
    try:
        rows = disk.meta.with_diff_id(diff_id)
    except sqlite3.Error as e:  # no metadata, no sharing: the layer is fetched as before
        log.warning("could not look up diff_id %s in %s: %s", diff_id, disk.meta.path, e)
        return []
    return [r for r in rows if r.digest != digest and disk.size(r.digest) == r.uncompressed_size]


def share(layer: LayerSpec, disk: DiskTier, wait: float = SOURCE_LOCK_WAIT) -> Linked | None:
    """Make `layer.digest` an entry with the content of another entry with its diff_id.

    None when no entry has the diff_id (or none could be used): the caller fetches. The
    caller holds `layer.digest`'s lock and has found no entry for it.
    """
    for row in candidates(disk, layer.digest, layer.diff_id):
        lock = disk.lock(row.digest)
        if not _acquire(lock, wait):
            log.info("entry %s is busy; not sharing it for %s", row.digest, layer.digest)
            continue
        try:
            shared = _share_from(layer, disk, row.digest)
        except (FileNotFoundError, NotAFile):  # removed or replaced by hand: look further
            continue
        except VerificationError as e:
            # The source is not what its row says. Drop it, as `verify` would, so no
            # later warm trusts it either.
            log.warning("not sharing %s for %s: %s; removing it", row.digest, layer.digest, e)
            disk.remove(row.digest)
            continue
        finally:
            lock.release()
        if shared is None:
            continue
        log.info(
            "layer shared by diff_id: %s = %s (%s, %d bytes) %s",
            layer.digest,
            shared.source,
            shared.how,
            shared.size,
            disk.path(layer.digest),
        )
        return shared
    return None


def _acquire(lock: DigestLock, wait: float) -> bool:
    deadline = time.monotonic() + wait
    while not lock.acquire(blocking=False):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _share_from(layer: LayerSpec, disk: DiskTier, source: Digest) -> Linked | None:
    # Read again under the source's lock: rm, gc or verify may have changed it since.
    row = disk.meta.layer(source)
    src = disk.path(source)
    try:
        st = regular(src, "cache entry")
    except NotAFile:
        return None  # not an entry (check_disk, verify or gc removes it under its lock)
    if st is None or row is None or row.diff_id != layer.diff_id:
        return None
    size = row.uncompressed_size
    if st.st_size != size:
        return None
    with disk.space_guard(), disk.ingest(layer.digest) as ingest:
        # A copy is readable by no more users than its source.
        ingest.mode = stat.S_IMODE(st.st_mode) & ENTRY_MODE
        if _hardlink(src, ingest):
            how: How = "hardlink"
            ingest.mode = None  # the source's own inode: its mode is left as it is
        elif _reflink(src, ingest):
            how = "reflink"
        else:
            how = "copy"
            tar = _copy(src, ingest, layer.diff_id, size)  # hashed as it is copied
        if how != "copy":
            # Re-hashed, though the source was hashed when it was written: a row's diff_id
            # is not always proof (check_disk adopts a file without a row by its size, with
            # the diff_id the image claims), and a new name must only ever appear for
            # content hashed against its diff_id. It costs one read of the file (usually
            # from the page cache), far less than the fetch and decompression it replaces.
            ingest.file.close()
            tar = hash_file(ingest.path, layer.diff_id, size, f"disk entry {src} ({how})")
        ingest.commit(layer, tar, Shared(source))
    # rename(2) onto a name of the same inode does nothing: never leave the temp name behind.
    ingest.path.unlink(missing_ok=True)
    return Linked(source, how, size)


def _hardlink(src: Path, ingest: Ingest) -> bool:
    """Make the ingest's temp name a hard link to `src`; False where links are refused."""
    side = ingest.path.with_name(ingest.path.name + ".link")
    try:
        os.link(src, side, follow_symlinks=False)
    except OSError as e:
        if e.errno not in LINK_REFUSED:
            raise
        log.info("cannot hard-link %s (%s): trying a reflink or a copy", src, e.strerror)
        return False
    try:
        ingest.file.close()
        os.replace(side, ingest.path)  # over the empty temp file; still inside .tmp
    except BaseException:
        side.unlink(missing_ok=True)
        raise
    return True


def _reflink(src: Path, ingest: Ingest) -> bool:
    """Clone `src`'s extents into the ingest file (btrfs, XFS); False where unsupported."""
    with open(open_file(src, what="cache entry"), "rb") as f:
        try:
            fcntl.ioctl(ingest.file.fileno(), FICLONE, f.fileno())
        except OSError:
            return False
    return True


def _copy(src: Path, ingest: Ingest, diff_id: Digest, size: int) -> Verified:
    """Copy `src` into the ingest file, hashing as it goes; raises unless it is `diff_id`."""
    verifier = Verifier(diff_id, size=size, what=f"disk entry {src} (copy)")
    with open(open_file(src, what="cache entry"), "rb") as f:
        while chunk := f.read(CHUNK):
            verifier.update(chunk)
            ingest.file.write(chunk)
    return verifier.verify()


def content_lock(disk: DiskTier, diff_id: Digest) -> DigestLock:
    """A lock per diff_id, so two digests of one content are not fetched side by side.

    Taken (blocking) only while holding a digest's lock, never the other way round, so it
    cannot close a cycle; its own name, because an uncompressed layer's digest is its
    diff_id and flock(2) on that digest's file would wait for ourselves.
    """
    disk.lock(diff_id)  # makes the lock directory (nothing is acquired)
    return DigestLock(disk.locks_dir / f"content_{diff_id.cache_name}.lock")


def source_for(disk: DiskTier, digest: Digest, diff_id: Digest) -> Digest | None:
    """The entry a warm would share for this layer, without changing anything."""
    found = candidates(disk, digest, diff_id)
    return found[0].digest if found else None
