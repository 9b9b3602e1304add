"""A layer's file index over its life: built as its tar streams by (headers only), kept
beside the entry, given its files' content digests and published with it, and made on
first use for an entry cached before indexes existed.

The index is derived data: it describes a tar whose bytes are verified, and it names the
diff_id it describes (pipeline/fileindex.py). A tar the indexer cannot read (a format it
does not know, a corrupt header in a tar that still hashes to its diff_id) is still the
layer: the entry is cached and published as always, without an index, and one warning
says why; reading its files then fails with that reason.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from pipeline.errors import LayerwarmError
from pipeline.fileindex import MAX_INDEX_BYTES, BadIndex, LayerIndex
from pipeline.layer import LayerSpec

if TYPE_CHECKING:
    from pipeline.tiers.disk import DiskTier
    from pipeline.tiers.remote import RemoteTier

log = logging.getLogger("layerwarm")
SCAN_CHUNK = 1 << 20


class IndexBuild:
    """Feed it the tar as it streams by (on any one thread); `store` after the commit."""

    def __init__(self, layer: LayerSpec) -> None:
        from pipeline.tarindex import TarIndexer  # the parser: only when a tar streams

        self.layer = layer
        # Headers only: the content digests are added when the index is published.
        self._indexer: TarIndexer | None = TarIndexer(layer.diff_id, digests=False)
        self.failure: str | None = None

    def feed(self, chunk: bytes | memoryview) -> None:
        if self._indexer is None:
            return
        try:
            self._indexer.feed(chunk)
        except LayerwarmError as e:  # the tar is still the layer: go on without an index
            self._give_up(str(e))

    def finish(self) -> LayerIndex | None:
        if self._indexer is None:
            return None
        try:
            index = self._indexer.finish()
        except LayerwarmError as e:
            self._give_up(str(e))
            return None
        if count := self._indexer.refused_count:
            log.warning("layer %s: %d tar entries left out of its file index (names that "
                        "would leave the image, or unusable): %s", self.layer.digest,
                        count, "; ".join(self._indexer.refused[:3]))
        return index

    def store(self, disk: DiskTier) -> LayerIndex | None:
        """Write the finished index beside the (committed) entry; the index, or None.
        Never raises: the layer is cached whatever happens to its index."""
        index = self.finish()
        if index is not None:
            try:
                disk.store_index(self.layer.digest, index.dumps())
            except (OSError, LayerwarmError) as e:
                log.warning("layer %s: could not store its file index in %s: %s",
                            self.layer.digest, disk.root, e)
        return index

    def _give_up(self, why: str) -> None:
        self._indexer, self.failure = None, why
        log.warning("layer %s: no file index: %s", self.layer.digest, why)


def disk_index(layer: LayerSpec, disk: DiskTier) -> LayerIndex | None:
    """The entry's index from the disk tier: stored, else made now from the entry's tar
    (an entry cached before indexes existed) and stored; None when the disk lacks it.
    The caller holds the digest's lock, or accepts that the entry may go meanwhile."""
    data = disk.load_index(layer.digest, MAX_INDEX_BYTES)
    if data is not None:
        try:
            return LayerIndex.loads(data, expect=layer.diff_id)
        except BadIndex as e:
            log.warning("layer %s: its stored file index is unusable (%s); making it again",
                        layer.digest, e)
    from pipeline.nofollow import open_file

    try:
        fd = open_file(disk.path(layer.digest), what="cache entry")
    except FileNotFoundError:
        return None
    build = IndexBuild(layer)
    with open(fd, "rb") as tar:
        while chunk := tar.read(SCAN_CHUNK):
            build.feed(chunk)
    return build.store(disk)


def publish_index(layer: LayerSpec, disk: DiskTier, remote: RemoteTier) -> bool:
    """Put the entry's index, with its content digests, in the remote tier (before the
    entry itself: a visible layer has its index); False when the entry has none (its tar
    could not be indexed, or is gone)."""
    index = disk_index(layer, disk)
    if index is not None and not index.digests:
        index = with_digests(layer, disk, index)
    if index is None:
        return False
    remote.put_index(layer.digest, index.dumps())
    return True


def with_digests(layer: LayerSpec, disk: DiskTier, index: LayerIndex) -> LayerIndex | None:
    """`index` with each file's content digests (whole up to a chunk, else per chunk),
    hashed from the entry's tar, and stored so; None when the entry is gone or shorter
    than its index says. The publish that calls it reads the entry next: its pages are
    the ones this pass brings in."""
    import hashlib
    from dataclasses import replace

    from pipeline.nofollow import open_file

    try:
        fd = open_file(disk.path(layer.digest), what="cache entry")
    except FileNotFoundError:
        return None
    size, entries = index.chunk_size, []
    try:
        for e in index.entries:
            if e.kind == "file":
                sums = []
                for at in range(0, max(e.size, 1), size):  # an empty file: one empty piece
                    want = min(size, e.size - at)
                    piece = os.pread(fd, want, e.offset + at)
                    if len(piece) != want:
                        log.warning("layer %s: %s is shorter in %s than its index says; "
                                    "the index is not published", layer.digest, e.path,
                                    disk.root)
                        return None
                    sums.append(hashlib.sha256(piece).hexdigest())
                e = replace(e, digest=sums[0], chunks=()) if e.size <= size else \
                    replace(e, digest="", chunks=tuple(sums))
            entries.append(e)
    finally:
        os.close(fd)
    index = replace(index, entries=tuple(entries), digests=True)
    try:
        disk.store_index(layer.digest, index.dumps())
    except (OSError, LayerwarmError) as e:
        log.warning("layer %s: could not store its file index in %s: %s", layer.digest,
                    disk.root, e)
    return index


def remote_index(layer: LayerSpec, remote: RemoteTier) -> LayerIndex | None:
    """The layer's index from the remote tier, checked to describe its diff_id; None
    when the tier has none (or an unusable one, said in a warning)."""
    data = remote.get_index(layer.digest, MAX_INDEX_BYTES)
    if data is None:
        return None
    try:
        index = LayerIndex.loads(data, expect=layer.diff_id)
        if not index.digests:
            raise BadIndex("it holds no content digests to check reads against")
        return index
    except BadIndex as e:
        log.warning("layer %s: the file index in %s is unusable: %s", layer.digest,
                    remote.url, e)
        return None
