"""Byte ranges of an image's layer tars, each from the first tier that has them.

The chain's order (pipeline/chain.py: `Chain.sources`), asked once per layer: the disk tier
(a pread of the entry, or of an entry with the same content), else the remote tier (a
ranged GET of only the pieces a read touches), else the registry (the layer is warmed,
then read from disk). The pieces a remote read
fetches are the units the layer's index holds a digest for: a file of at most one chunk
whole, a larger file chunk by chunk. Each is checked against its digest before anyone
sees a byte of it; a mismatch is a VerificationError naming the layer and the range (an
I/O error for a mount), never wrong bytes. Verified pieces stay in a bounded cache, and a
read that reaches a chunk's end also fetches the next one (readahead).
"""

from __future__ import annotations

import bisect
import hashlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence

from pipeline.chain import Chain, LayerSource
from pipeline.errors import NotFound, VerificationError
from pipeline.fileindex import Entry, LayerIndex
from pipeline.layer import LayerSpec

log = logging.getLogger("layerwarm")
CACHE_BYTES = 64 << 20  # verified remote pieces kept in memory, per reader


class _Unit:
    """A verifiable piece of a layer tar: [start, end) and its sha256 (hex)."""

    __slots__ = ("start", "end", "digest")

    def __init__(self, start: int, end: int, digest: str) -> None:
        self.start, self.end, self.digest = start, end, digest


class _LayerUnits:
    """Where the verifiable pieces of one layer lie, for finding the ones a range needs."""

    def __init__(self, index: LayerIndex) -> None:
        files = sorted((e for e in index.entries if e.kind == "file" and e.size > 0),
                       key=lambda e: e.offset)
        self.files: list[Entry] = files
        self.starts = [e.offset for e in files]
        self.chunk_size = index.chunk_size

    def unit_at(self, offset: int) -> _Unit | None:
        """The piece holding byte `offset`, or None when no file's data holds it."""
        i = bisect.bisect_right(self.starts, offset) - 1
        if i < 0:
            return None
        e = self.files[i]
        if not e.offset <= offset < e.offset + e.size:
            return None
        if not e.chunks:
            return _Unit(e.offset, e.offset + e.size, e.digest)
        n = (offset - e.offset) // self.chunk_size
        if n >= len(e.chunks):
            return None
        start = e.offset + n * self.chunk_size
        return _Unit(start, min(start + self.chunk_size, e.offset + e.size), e.chunks[n])


class TierReader:
    """Reads of the image's layers (by their position in `layers`), through the tiers."""

    def __init__(self, layers: Sequence[LayerSpec], indexes: Sequence[LayerIndex],
                 chain: Chain, warm: Callable[[LayerSpec], object],
                 cache_bytes: int = CACHE_BYTES) -> None:
        self.layers, self.indexes = list(layers), list(indexes)
        self.chain, self._warm = chain, warm
        self._units = [_LayerUnits(x) for x in self.indexes]
        self._sources: dict[int, LayerSource] = {}
        self._cache: OrderedDict[tuple[int, int], bytes] = OrderedDict()
        self._cached, self._cap = 0, cache_bytes
        self._lock = threading.Lock()
        self.remote_bytes = 0  # fetched from the remote tier (for tests and the bench)

    def read(self, pos: int, offset: int, length: int) -> bytes:
        """`length` bytes of layer `pos`'s tar from `offset` (fewer only at its end)."""
        length = max(0, min(length, self.indexes[pos].tar_size - offset))
        if length == 0:
            return b""
        source = self._source(pos)
        try:
            if source.name == "remote":
                return self._remote(pos, source, offset, length)
            return source.read_range(self.layers[pos], offset, length)
        except NotFound:  # gone from that tier since it was asked: ask the tiers again
            with self._lock:
                self._sources.pop(pos, None)
            source = self._source(pos)
            if source.name == "remote":
                return self._remote(pos, source, offset, length)
            return source.read_range(self.layers[pos], offset, length)

    def close(self) -> None:
        pass  # nothing held open: each tier read opens what it reads

    def _source(self, pos: int) -> LayerSource:
        """The first tier holding the layer; none: it is warmed from the registry first."""
        with self._lock:
            if pos in self._sources:
                return self._sources[pos]
        layer = self.layers[pos]
        source = next((s for s in self.chain.sources() if s.has(layer)), None)
        if source is None:
            self._warm(layer)
            source = next((s for s in self.chain.sources() if s.name != "remote"
                           and s.has(layer)), None)
            if source is None:
                raise NotFound(f"layer {layer.digest}: not on disk after warming it")
        with self._lock:
            self._sources[pos] = source
        return source

    # -- the remote tier: verified pieces ------------------------------------------------

    def _remote(self, pos: int, source: LayerSource, offset: int, length: int) -> bytes:
        if not self.indexes[pos].digests:  # the disk's index: the layer left the disk since
            raise VerificationError(
                f"layer {self.layers[pos].digest}: left the disk tier while the image was "
                "open, and its index there has no content digests to check a read from the "
                "remote tier against; open the image again")
        out = bytearray()
        end = offset + length
        while offset < end:
            unit = self._units[pos].unit_at(offset)
            if unit is None:  # headers or padding: no digest covers them
                raise VerificationError(
                    f"layer {self.layers[pos].digest}: bytes {offset}.. of its tar lie in no "
                    "file's data; the remote tier serves only verified file contents")
            data = self._piece(pos, source, unit)
            take = data[offset - unit.start:min(end, unit.end) - unit.start]
            out += take
            offset += len(take)
            if offset == unit.end and offset < self.indexes[pos].tar_size:
                self._readahead(pos, source, unit.end)
        return bytes(out)

    def _piece(self, pos: int, source: LayerSource, unit: _Unit) -> bytes:
        key = (pos, unit.start)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        layer = self.layers[pos]
        data = source.read_range(layer, unit.start, unit.end - unit.start)
        self.remote_bytes += len(data)
        if len(data) != unit.end - unit.start or hashlib.sha256(data).hexdigest() != unit.digest:
            where = getattr(source, "remote", None)
            log.error("layer %s: bytes %d-%d from %s do not match its file index",
                      layer.digest, unit.start, unit.end, getattr(where, "url", source.name))
            raise VerificationError(
                f"layer {layer.digest}: bytes {unit.start}-{unit.end} from "
                f"{getattr(where, 'url', source.name)} do not match the layer's file index")
        with self._lock:
            self._cache[key] = data
            self._cached += len(data)
            while self._cached > self._cap and len(self._cache) > 1:
                _, old = self._cache.popitem(last=False)
                self._cached -= len(old)
        return data

    def _readahead(self, pos: int, source: LayerSource, offset: int) -> None:
        """Fetch the piece after a fully read one, if it is a chunk of the same large file:
        a sequential read then waits on one GET per chunk, not per read call."""
        unit = self._units[pos].unit_at(offset)
        if unit is None or (pos, unit.start) in self._cache:
            return
        if unit.end - unit.start < self._units[pos].chunk_size:
            return  # a whole small file, or a large file's tail: read when asked for
        try:
            self._piece(pos, source, unit)
        except (NotFound, VerificationError):
            pass  # said when it is read
