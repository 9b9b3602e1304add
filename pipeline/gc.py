"""Garbage collection: keep the disk tier under a quota, and the remote tier under its policy.

Disk (`collect`), in one pass:

1. sweep `.tmp/` and `.staging/` files older than a grace period; a file named for a digest
   whose lock is held (a fetch or decompress writing it) is left alone at any age;
2. reconcile `.meta.db` with the files, which stay the truth: a row whose file is gone is
   dropped; a file without a row is adopted (rehashed for its diff_id and recorded, last
   used = its mtime, so it keeps its place in the LRU order);
3. evict least recently used entries until the cache is at most the target size;
4. drop the image configs `.meta.db` stores that no warm used for `config_ttl` seconds
   (LAYERWARM_STORED_CONFIG_TTL), compacting the file when that freed a quarter of it.

Sizes count each inode once: entries with the same content may be hard links (two names,
one inode), and removing one name frees nothing while another remains. So the unit of
eviction is the inode: its names go together, it is as recent as its most recent name,
and it is spared whole when any of its names is pinned, protected or locked. A name is
only removed while this process holds its digest lock (taken without waiting: a locked
layer is being read or written, so it is skipped and reported instead).

Remote (`collect_remote`): oldest objects first by their time in the tier, by age and/or
total size; only names `sha256_<hex>` below the configured root are ever listed, so
nothing else can be deleted. There is no lock across hosts: a worker restoring a layer
deleted under it finds it missing and falls back to the registry.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from collections.abc import Collection, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Literal

from pipeline.config import Settings
from pipeline.digest import Digest, digest_of_file
from pipeline.errors import InvalidDigest, NotAFile
from pipeline.table import counted
from pipeline.tiers.disk import DiskTier
from pipeline.tiers.remote import RemoteEntry, RemoteTier

log = logging.getLogger("layerwarm")

DEFAULT_GRACE = 3600.0

SkipReason = Literal["pinned", "locked", "in use by this warm"]


@dataclass(frozen=True)
class Evicted:
    digest: Digest
    size: int
    freed: int  # 0 while another name of the same inode remains
    last_used: float | None


@dataclass(frozen=True)
class Skipped:
    digest: Digest
    size: int
    reason: SkipReason


@dataclass(frozen=True)
class Swept:
    path: str  # relative to the cache dir, e.g. ".tmp/sha256_...abc.x1y2"
    size: int


@dataclass
class GcReport:
    target: int | None  # bytes to get under; None: no quota, housekeeping only
    size_before: int = 0
    size_after: int = 0
    dry_run: bool = False
    evicted: list[Evicted] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    swept: list[Swept] = field(default_factory=list)
    adopted: list[Digest] = field(default_factory=list)
    dropped: list[Digest] = field(default_factory=list)  # rows whose file was gone
    configs_dropped: int = 0  # stored image configs unused for the TTL
    config_bytes_dropped: int = 0

    @property
    def freed(self) -> int:
        return sum(e.freed for e in self.evicted)

    @property
    def under_quota(self) -> bool:
        return self.target is None or self.size_after <= self.target


@dataclass
class _Inode:
    """One file in the cache and every entry name it has there."""

    size: int
    names: list[Digest] = field(default_factory=list)
    last_used: float = 0.0  # of its most recently used name (an mtime when no row)


@contextmanager
def _try_lock(disk: DiskTier, digest: Digest) -> Iterator[bool]:
    """The digest's lock if free right now (True), else False; released on exit."""
    lock = disk.lock(digest)
    got = lock.acquire(blocking=False)
    try:
        yield got
    finally:
        if got:
            lock.release()


def _digest_of_file_name(name: str) -> Digest | None:
    """The digest a temp or staging file belongs to (`sha256_<hex>` then anything), or None."""
    head = name.split(".", 1)[0]
    try:
        return Digest.parse(head, allow_cache_name=True)
    except InvalidDigest:
        return None


def sweep(
    disk: DiskTier, grace: float, *, dry_run: bool = False, now: float | None = None
) -> list[Swept]:
    """Remove files in `.tmp/` and `.staging/` last modified more than `grace` seconds ago.

    A running fetch keeps its `.partial` young (it writes) and its digest locked, so it is
    never swept; a file whose digest is locked is skipped whatever its age.
    """
    now = time.time() if now is None else now
    out = []
    for sub in (disk.tmp_dir, disk.staging_dir):
        try:
            if not stat.S_ISDIR(os.lstat(sub).st_mode):
                continue  # a link put in its place: what it points to is not ours
            items = list(os.scandir(sub))
        except FileNotFoundError:
            continue
        for item in items:
            try:
                st = item.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(st.st_mode) or now - st.st_mtime < grace:
                continue  # never a tree removal: only files layerwarm itself writes there
            digest = _digest_of_file_name(item.name)
            rel = f"{sub.name}/{item.name}"
            if dry_run:
                out.append(Swept(rel, st.st_size))
                continue
            with ExitStack() as stack:
                if digest is not None and not stack.enter_context(_try_lock(disk, digest)):
                    continue
                try:
                    os.unlink(item.path)
                except FileNotFoundError:
                    continue
                out.append(Swept(rel, st.st_size))
    return out


def _reconcile(disk: DiskTier, report: GcReport) -> None:
    """Rows without files are dropped; files without rows are rehashed and recorded.

    A name that is not a regular file (a planted link, a FIFO) is removed, with a warning.
    """
    if not report.dry_run:
        _drop_strays(disk)
    on_disk = set(disk.entries())
    for row in disk.meta.layers():
        if row.digest in on_disk:
            continue
        if not report.dry_run:
            with _try_lock(disk, row.digest) as got:
                # Under the lock, so a warm committing it right now is not undone.
                if not got or disk.has(row.digest):
                    continue
                disk.meta.forget(row.digest)
        report.dropped.append(row.digest)
    if report.dry_run:
        return
    known = {r.digest for r in disk.meta.layers()}
    for digest in sorted(on_disk - known):
        with _try_lock(disk, digest) as got:
            if got and disk.meta.layer(digest) is None:
                report.adopted += adopt(disk, [digest])


def adopt(disk: DiskTier, digests: Collection[Digest]) -> list[Digest]:
    """Rehash each entry and record it (adopted: last used = its mtime); those recorded.

    Also how a `.meta.db` made anew is refilled (DiskTier): then without the digests'
    locks, which its caller may hold; a warm's own row, recorded after, wins anyway.
    """
    out = []
    for digest in digests:
        path = disk.path(digest)
        try:
            st = os.stat(path, follow_symlinks=False)
            if not stat.S_ISREG(st.st_mode):
                continue  # a link to elsewhere is never read, let alone recorded
            diff_id, size = digest_of_file(path)
        except FileNotFoundError:
            continue
        disk.meta.adopt_layer(digest, diff_id, size, st.st_mtime)
        out.append(digest)
        log.info("adopted %s (no record; diff_id %s)", digest, diff_id)
    return out


def _drop_strays(disk: DiskTier) -> None:
    for digest in disk.strays():
        with _try_lock(disk, digest) as got:
            try:
                if got:
                    disk.checked_size(digest)  # the name goes, never what a link names
            except NotAFile as e:  # a directory: never removed as a tree
                log.warning("gc: %s", e)


def _inodes(disk: DiskTier) -> list[_Inode]:
    rows = {r.digest: r for r in disk.meta.layers()}
    by_inode: dict[tuple[int, int], _Inode] = {}
    for digest in disk.entries():
        try:
            st = os.stat(disk.path(digest), follow_symlinks=False)
        except FileNotFoundError:
            continue
        node = by_inode.setdefault((st.st_dev, st.st_ino), _Inode(st.st_size))
        node.names.append(digest)
        row = rows.get(digest)
        used = row.last_used if row is not None else st.st_mtime
        node.last_used = max(node.last_used, used)
    return list(by_inode.values())


def cache_size(disk: DiskTier) -> int:
    """Bytes the entries take, each inode counted once."""
    return sum(n.size for n in _inodes(disk))


def collect(
    disk: DiskTier,
    target: int | None,
    *,
    dry_run: bool = False,
    grace: float = DEFAULT_GRACE,
    protect: Collection[Digest] = (),
    now: float | None = None,
    config_ttl: float | None = None,
) -> GcReport:
    """Sweep, reconcile, and evict LRU entries until the cache is at most `target` bytes.

    `protect`: layers never evicted by this run (those a warm has just materialized).
    `config_ttl`: drop stored image configs unused for this long (None: keep them).
    `dry_run` changes nothing (no lock is taken either) and reports what would happen.
    """
    now = time.time() if now is None else now
    report = GcReport(target, dry_run=dry_run)
    if not disk.root.is_dir():
        return report  # nothing cached yet; gc never creates the cache
    report.swept = sweep(disk, grace, dry_run=dry_run, now=now)
    _reconcile(disk, report)
    if not dry_run:
        disk.meta.drop_expired_pins(now)
    pinned = disk.meta.pinned_until(now)
    protected = set(protect)
    inodes = sorted(_inodes(disk), key=lambda n: (n.last_used, min(n.names)))
    total = report.size_before = sum(n.size for n in inodes)
    for node in inodes:
        if target is None or total <= target:
            break
        reason = _spared(node, pinned, protected)
        if reason is not None:
            report.skipped += [Skipped(d, node.size, reason) for d in node.names]
            continue
        if dry_run:
            last = len(node.names) - 1  # the inode is freed with its last name
            report.evicted += [
                Evicted(d, node.size, node.size if i == last else 0, node.last_used)
                for i, d in enumerate(node.names)
            ]
            total -= node.size
            continue
        evicted = _evict(disk, node)
        if evicted is None:
            report.skipped += [Skipped(d, node.size, "locked") for d in node.names]
            continue
        report.evicted += evicted
        total -= node.size
    report.size_after = total
    if config_ttl is not None:
        report.configs_dropped, report.config_bytes_dropped = disk.meta.drop_configs(
            now - config_ttl, dry_run=dry_run)
    return report


def _spared(node: _Inode, pinned: dict[str, float], protected: set[Digest]) -> SkipReason | None:
    if any(str(d) in pinned for d in node.names):
        return "pinned"
    if any(d in protected for d in node.names):
        return "in use by this warm"
    return None


def _evict(disk: DiskTier, node: _Inode) -> list[Evicted] | None:
    """Remove every name of one inode under their locks; None when one of them is locked."""
    with ExitStack() as stack:
        if not all(stack.enter_context(_try_lock(disk, d)) for d in node.names):
            return None
        out = []
        for digest in node.names:
            try:
                links = os.stat(disk.path(digest), follow_symlinks=False).st_nlink
            except FileNotFoundError:
                links = 0  # removed by someone else (rm) since the scan: frees nothing here
            freed = node.size if links == 1 else 0
            if not disk.remove(digest):
                continue
            disk.meta.bump("evictions")
            disk.meta.bump("evicted_bytes", freed)
            out.append(Evicted(digest, node.size, freed, node.last_used))
            log.info("gc: evicted %s (%d bytes, %d freed)", digest, node.size, freed)
        return out


def auto_collect(
    disk: DiskTier, settings: Settings, protect: Collection[Digest] = ()
) -> GcReport | None:
    """After a warm: above the high watermark of the quota, collect down to the low one.

    None when no quota is set or the cache is below the high watermark (nothing done).
    """
    if settings.max_cache_size is None or not disk.root.is_dir():
        return None
    quota = settings.max_cache_size.bytes
    if cache_size(disk) <= settings.cache_high_watermark * quota:
        return None
    report = collect(disk, int(settings.cache_low_watermark * quota), protect=protect,
                     config_ttl=settings.stored_config_ttl)
    show = settings.max_cache_size.show  # in the unit LAYERWARM_MAX_CACHE_SIZE was given in
    log.info("gc: cache above %.0f%% of %s: evicted %s, %s freed",
             settings.cache_high_watermark * 100, settings.max_cache_size,
             counted(len(report.evicted), "layer"), show(report.freed))
    if not report.under_quota:
        log.warning("gc: cache still holds %s, above its low watermark of %s: the rest "
                    "is pinned, locked or used by this warm",
                    show(report.size_after), show(report.target or 0))
    return report


def scheduled_collect(disk: DiskTier, settings: Settings) -> GcReport | None:
    """The periodic gc of a node (Celery beat): the automatic quota, else housekeeping.

    None when the node has no quota (LAYERWARM_MAX_CACHE_SIZE unset): then it does nothing.
    """
    if settings.max_cache_size is None:
        return None
    # Below the high watermark nothing is evicted, but old temp files are still swept.
    return auto_collect(disk, settings) or collect(disk, None,
                                                  config_ttl=settings.stored_config_ttl)


# ---------------------------------------------------------------- remote tier


@dataclass(frozen=True)
class RemoteEvicted:
    digest: Digest
    size: int
    modified: float | None


@dataclass
class RemoteGcReport:
    max_size: int | None
    older_than: float | None
    size_before: int = 0
    size_after: int = 0
    dry_run: bool = False
    evicted: list[RemoteEvicted] = field(default_factory=list)
    pinned: list[Digest] = field(default_factory=list)

    @property
    def freed(self) -> int:
        return sum(e.size for e in self.evicted)

    @property
    def under_quota(self) -> bool:
        return self.max_size is None or self.size_after <= self.max_size


def collect_remote(
    remote: RemoteTier,
    *,
    max_size: int | None = None,
    older_than: float | None = None,
    dry_run: bool = False,
    disk: DiskTier | None = None,
    now: float | None = None,
) -> RemoteGcReport:
    """Delete remote layers older than `older_than` seconds, then the oldest until the tier
    holds at most `max_size` bytes. Layers pinned in `disk`'s metadata are spared; each
    deletion bumps `remote_evictions` there."""
    now = time.time() if now is None else now
    report = RemoteGcReport(max_size, older_than, dry_run=dry_run)
    pinned = disk.meta.pinned_until(now) if disk is not None else {}
    entries = sorted(remote.list(), key=lambda e: (e.modified or 0.0, e.digest))
    total = report.size_before = sum(e.size for e in entries)

    def too_old(e: RemoteEntry) -> bool:
        return older_than is not None and e.modified is not None and now - e.modified > older_than

    for entry in entries:
        over = max_size is not None and total > max_size
        if not (over or too_old(entry)):
            continue
        if str(entry.digest) in pinned:
            report.pinned.append(entry.digest)
            continue
        if not dry_run:
            if not remote.delete(entry.digest):
                total -= entry.size  # gone already (another gc): not ours to count
                continue
            if disk is not None and disk.root.is_dir():
                disk.meta.bump("remote_evictions")
                disk.meta.bump("remote_evicted_bytes", entry.size)
            log.info("gc: evicted %s from %s (%d bytes)", entry.digest, remote.url, entry.size)
        report.evicted.append(RemoteEvicted(entry.digest, entry.size, entry.modified))
        total -= entry.size
    report.size_after = total
    return report
