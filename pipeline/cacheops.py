"""Operate the cache: what it holds (`ls`, `inspect`, `usage`, `df`) and removing layers (`rm`).

The files stay the source of truth: an entry is listed because `sha256_<hex>` exists on disk
(or in the remote tier), and `.meta.db` only adds what it knows about it. A row without a
file is not listed. Reading never creates the cache directory or its database.

Digests from users are parsed strictly (`sha256:<hex>`, `sha256_<hex>`, or a unique prefix
of 12+ hex resolved against the cache's own names) before anything becomes a path, object
key or lock name; `rm` holds the digest's lock, so it waits for a
warm that is materializing that layer. This module decides and returns values; the CLI
prints them.
"""

from __future__ import annotations

import os
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass, replace

from pipeline.digest import Digest
from pipeline.errors import InvalidDigest, LayerwarmError, NotFound, UsageError
from pipeline.metadata import ImageRow
from pipeline.tiers.disk import DiskTier
from pipeline.tiers.remote import RemoteTier

MIN_PREFIX = 12  # hex digits a short digest needs, as `warm` prints it (sha256:fc1d8747c59a)
# A short form: sha256:<hex>, sha256_<hex> or the bare hex, as docker and crane take them.
_SHORT = re.compile(rf"(?:sha256[:_])?([0-9a-f]{{{MIN_PREFIX},64}})")
_AMBIGUOUS_SHOWN = 10  # candidates listed in the one line; more are counted


def resolve_digests(disk: DiskTier, texts: Sequence[str]) -> list[Digest]:
    """Every text as the Digest of a layer: in full, or a unique prefix of a cached one.

    A full digest is taken as is (a layer the cache no longer holds still has a name). A
    prefix is looked up among the entries on disk and the layers `.meta.db` records: one
    match is that layer, none is NotFound ("not in the cache", exit 1), several a UsageError
    listing them (exit 2). Anything else is a UsageError: no string becomes a path unparsed.
    """
    known: list[Digest] | None = None
    out = []
    for text in texts:
        try:
            out.append(Digest.parse(text, allow_cache_name=True))
            continue
        except InvalidDigest:
            pass
        m = _SHORT.fullmatch(text)
        if m is None:
            shown = repr(text if len(text) <= 80 else text[:77] + "...")  # repr: one line
            raise UsageError(f"invalid digest {shown}: want sha256:<64 hex>, sha256_<64 hex> "
                             f"or a unique prefix of {MIN_PREFIX}+ hex (sha256:fc1d8747c59a)")
        if len(m.group(1)) == 64:  # bare hex: a full sha256 without its algorithm
            out.append(Digest("sha256", m.group(1)))
            continue
        known = _known_digests(disk) if known is None else known
        out.append(_unique(text, [d for d in known if d.hex.startswith(m.group(1))]))
    return out


def _known_digests(disk: DiskTier) -> list[Digest]:
    """Layers a prefix may name: entries on disk, and those .meta.db has rows for."""
    names = {str(d) for d in disk.entries()}
    names |= {str(r.digest) for r in disk.meta.layers()}
    names |= {r.layer_digest for r in disk.meta.image_rows()}
    out = []
    for name in sorted(names):
        try:
            out.append(Digest.parse(name))
        except InvalidDigest:
            continue  # a row we cannot trust names no layer
    return out


def _unique(text: str, matches: list[Digest]) -> Digest:
    if not matches:
        raise NotFound(f"{text}: not in the cache")
    if len(matches) > 1:
        shown = ", ".join(str(d) for d in matches[:_AMBIGUOUS_SHOWN])
        more = len(matches) - _AMBIGUOUS_SHOWN
        raise UsageError(f"{text} is ambiguous: {len(matches)} cached layers start with it: "
                         f"{shown}" + (f" and {more} more" if more > 0 else ""))
    return matches[0]


@dataclass(frozen=True)
class ImageUse:
    ref: str
    manifest_digest: str
    platform: str | None


@dataclass(frozen=True)
class Entry:
    """One layer as the cache knows it. Unknown values (no row, no metadata) are None."""

    digest: Digest
    disk_size: int | None  # None: not on disk
    remote_size: int | None  # None: not in the remote tier, or no remote asked
    images: tuple[ImageUse, ...] = ()
    diff_id: str | None = None
    media_type: str | None = None
    compressed_size: int | None = None
    uncompressed_size: int | None = None
    created: float | None = None
    last_used: float | None = None
    pinned_until: float | None = None  # protected from gc until then (`layerwarm pin`)

    @property
    def tiers(self) -> tuple[str, ...]:
        return tuple(t for t, s in (("disk", self.disk_size), ("remote", self.remote_size))
                     if s is not None)

    @property
    def size(self) -> int:
        return self.disk_size if self.disk_size is not None else self.remote_size or 0

    @property
    def image_count(self) -> int:
        """Distinct images (manifest digests) using the layer; one image may have many refs."""
        return len({i.manifest_digest for i in self.images})


def _uses(rows: Sequence[ImageRow]) -> dict[str, tuple[ImageUse, ...]]:
    out: dict[str, list[ImageUse]] = defaultdict(list)
    for r in rows:
        out[r.layer_digest].append(ImageUse(r.ref, r.manifest_digest, r.platform))
    return {k: tuple(v) for k, v in out.items()}


def _entry(disk: DiskTier, digest: Digest, disk_size: int | None, remote_size: int | None,
           images: tuple[ImageUse, ...], remote_meta: dict[str, str] | None = None) -> Entry:
    row = disk.meta.layer(digest) if disk_size is not None else None
    if row is not None:
        # An entry gc adopted (no row, rehashed) has no known media type or compressed size.
        return Entry(digest, disk_size, remote_size, images, str(row.diff_id),
                     row.media_type or None, row.compressed_size or None,
                     row.uncompressed_size, row.created, row.last_used)
    meta = remote_meta or {}

    def number(key: str) -> int | None:
        value = meta.get(key, "")
        return int(value) if value.isdigit() else None

    return Entry(digest, disk_size, remote_size, images, meta.get("diff-id"),
                 meta.get("media-type"), number("compressed-size"), number("uncompressed-size"))


def list_entries(disk: DiskTier, remote: RemoteTier | None = None) -> list[Entry]:
    """Every entry on disk (and in `remote`), joined with what `.meta.db` records."""
    pins = disk.meta.pinned_until()
    return [replace(e, pinned_until=pins.get(str(e.digest))) if str(e.digest) in pins else e
            for e in _list_entries(disk, remote)]


def _list_entries(disk: DiskTier, remote: RemoteTier | None) -> list[Entry]:
    uses = _uses(disk.meta.image_rows())
    remote_sizes = {e.digest: e.size for e in remote.list()} if remote is not None else {}
    out = []
    for digest in sorted(set(disk.entries()) | set(remote_sizes)):
        disk_size = disk.size(digest)
        if disk_size is None and digest not in remote_sizes:
            continue  # removed while we listed
        out.append(_entry(disk, digest, disk_size, remote_sizes.get(digest),
                          uses.get(str(digest), ())))
    return out


def inspect(disk: DiskTier, digest: Digest, remote: RemoteTier | None = None) -> Entry | None:
    """One layer in detail, or None when no tier holds it."""
    disk_size = disk.size(digest)
    stat = remote.stat(digest) if remote is not None else None
    if disk_size is None and stat is None:
        return None
    images = _uses(disk.meta.image_rows(digest)).get(str(digest), ())
    entry = _entry(disk, digest, disk_size, stat.size if stat else None, images,
                   stat.metadata if stat else None)
    return replace(entry, pinned_until=disk.meta.pinned_until().get(str(digest)))


def usage(disk: DiskTier, digest: Digest) -> tuple[ImageUse, ...]:
    """The images recorded as using the layer (whether or not it is cached right now)."""
    return _uses(disk.meta.image_rows(digest)).get(str(digest), ())


@dataclass(frozen=True)
class Removed:
    digest: Digest
    tiers: tuple[str, ...]  # where it was removed from; empty: it was in none
    error: str | None = None

    @property
    def ok(self) -> bool:
        return bool(self.tiers) and self.error is None


def remove(
    disk: DiskTier, digests: Sequence[Digest], remote: RemoteTier | None = None,
    on_wait: Callable[[Digest], None] | None = None,
) -> list[Removed]:
    """Remove each layer from disk (and `remote`) under its lock; its row goes with it.

    A warm materializing the layer holds the same lock, so this waits for it (`on_wait` is
    called first) instead of removing under it. Images keep their record of using the
    layer: the next warm of any of them fetches it again.
    """
    out = []
    for digest in digests:
        tiers: list[str] = []
        try:
            if disk.root.is_dir():  # nothing to remove (or lock) on a cache never written
                lock = disk.lock(digest)
                if not lock.acquire(blocking=False):
                    if on_wait is not None:
                        on_wait(digest)
                    lock.acquire()
                try:
                    if disk.remove(digest):
                        tiers.append("disk")
                    if remote is not None and remote.delete(digest):
                        tiers.append("remote")
                finally:
                    lock.release()
            elif remote is not None and remote.delete(digest):
                tiers.append("remote")
        except (LayerwarmError, OSError) as e:
            out.append(Removed(digest, tuple(tiers), str(e)))
            continue
        out.append(Removed(digest, tuple(tiers)))
    return out


@dataclass(frozen=True)
class Totals:
    entries: int
    bytes: int
    images: int  # distinct images (manifest digests) using at least one entry
    shared_entries: int  # entries used by more than one image
    referenced_bytes: int  # sum over images of their cached layers' sizes
    unique_bytes: int  # sum over cached layers that some image uses, each once

    @property
    def saved_bytes(self) -> int:
        """What sharing saves: the images' layers counted per image, minus one copy each."""
        return self.referenced_bytes - self.unique_bytes


def _image_layers(disk: DiskTier, present: Container[str]) -> dict[str, set[str]]:
    """Per image (manifest digest), its layers that are in `present`."""
    layers_of: dict[str, set[str]] = defaultdict(set)
    for r in disk.meta.image_rows():
        if r.layer_digest in present:
            layers_of[r.manifest_digest].add(r.layer_digest)
    return layers_of


def totals(disk: DiskTier) -> Totals:
    sizes = {str(e.digest): e.size for e in list_entries(disk)}
    layers_of = _image_layers(disk, sizes)
    users: dict[str, int] = defaultdict(int)
    for layers in layers_of.values():
        for d in layers:
            users[d] += 1
    return Totals(
        entries=len(sizes),
        bytes=sum(sizes.values()),
        images=len(layers_of),
        shared_entries=sum(1 for n in users.values() if n > 1),
        referenced_bytes=sum(sizes[d] for layers in layers_of.values() for d in layers),
        unique_bytes=sum(sizes[d] for d in users),
    )


# ---------------------------------------------------------------- sharing by diff_id
# Entries with the same diff_id are hard links to one file (pipeline/sharing.py): a file is
# identified by (st_dev, st_ino) and its bytes are counted once however many names it has.


@dataclass(frozen=True)
class SharingTotals:
    stored_bytes: int  # on disk: each file once, however many entry names it has
    linked_entries: int  # entries whose file has another entry name (same diff_id)
    cross_compression_saved_bytes: int  # sizes of all names, minus each file once
    image_bytes: int  # what the images would take if each stored its own cached layers
    cross_image_saved_bytes: int  # image_bytes minus what is stored for those layers


def _files(disk: DiskTier) -> dict[str, tuple[tuple[int, int], int]]:
    """Entry name (as a digest string) -> ((st_dev, st_ino), size), for entries on disk."""
    out = {}
    for digest in disk.entries():
        try:
            st = os.lstat(disk.path(digest))
        except FileNotFoundError:
            continue  # removed while we looked
        out[str(digest)] = ((st.st_dev, st.st_ino), st.st_size)
    return out


def sharing_totals(disk: DiskTier) -> SharingTotals:
    """Bytes saved by hard links (cross-compression) and by images sharing layers."""
    files = _files(disk)
    names = Counter(ino for ino, _ in files.values())
    stored = sum(dict(files.values()).values())
    image_layers = [d for layers in _image_layers(disk, files).values() for d in layers]
    image_bytes = sum(files[d][1] for d in image_layers)
    image_stored = sum(dict(files[d] for d in image_layers).values())
    return SharingTotals(
        stored_bytes=stored,
        linked_entries=sum(1 for ino, _ in files.values() if names[ino] > 1),
        cross_compression_saved_bytes=sum(size for _, size in files.values()) - stored,
        image_bytes=image_bytes,
        cross_image_saved_bytes=image_bytes - image_stored,
    )


def shares_with(disk: DiskTier, digest: Digest) -> list[Digest]:
    """Other entries that are the same file as `digest`'s entry (hard links, same diff_id)."""
    row = disk.meta.layer(digest)
    try:
        ino = os.lstat(disk.path(digest)).st_ino
    except FileNotFoundError:
        return []
    if row is None:
        return []
    out = []
    for other in disk.meta.with_diff_id(row.diff_id):
        try:
            if other.digest != digest and os.lstat(disk.path(other.digest)).st_ino == ino:
                out.append(other.digest)
        except FileNotFoundError:
            continue
    return out
