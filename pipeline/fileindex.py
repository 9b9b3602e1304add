"""A layer's file index: every entry of its tar, where its data lies, and content digests.

Built while the decompress stage streams the tar (pipeline/tarindex.py), stored beside the
layer and published with it, and read by the merged image view (pipeline/imageview.py) so
that a file can be listed, and its bytes read at their offset in the tar, without reading
the rest of the layer.

Stored form: one zstd frame, its content laid out by pipeline/indexform.py (columns;
the older form of JSON rows is still read). A reader that meets an unknown format
refuses it instead of guessing.
"""

from __future__ import annotations

import gc
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

from pipeline.digest import Digest
from pipeline.errors import PermanentError

CHUNK_SIZE = 4 << 20  # a larger file's content is digested per chunk of this size
MAX_INDEX_BYTES = 256 << 20  # a stored index larger than this (decompressed) is refused

Kind = Literal["file", "dir", "symlink", "hardlink", "char", "block", "fifo",
               "whiteout", "opaque"]
KINDS: tuple[str, ...] = ("file", "dir", "symlink", "hardlink", "char", "block", "fifo",
                          "whiteout", "opaque")


class BadIndex(PermanentError):
    """A stored index that cannot be used: corrupt, too large, another format, another
    layer's. The layer itself is not in question; its index is made again from the tar."""


@dataclass(slots=True)
class Entry:
    """One tar entry, as the layer's tar says it (not yet merged with other layers).

    `path` is normalised: relative, `/`-separated, no `.`/`..`/empty components, no
    trailing slash; the layer's root directory itself is "". A `whiteout` entry's path is
    the path it hides (`a/b` for the tar member `a/.wh.b`); an `opaque` entry's path is the
    directory whose lower contents it hides (`a` for `a/.wh..wh..opq`). `link` is a
    symlink's target as written, or a hardlink's target path, normalised like `path`.
    `offset` is where a regular file's data starts in the tar. A file of at most
    CHUNK_SIZE has `digest`, the sha256 (hex) of its content; a larger one has `chunks`,
    the sha256 of each CHUNK_SIZE piece, instead, and an empty `digest` (an index made
    before that change may hold both).
    """

    path: str
    kind: Kind
    mode: int = 0o644  # permission bits, with setuid/setgid/sticky (0o7777)
    uid: int = 0
    gid: int = 0
    mtime: float = 0.0
    size: int = 0
    offset: int = 0
    link: str = ""
    devmajor: int = 0
    devminor: int = 0
    uname: str = ""
    gname: str = ""
    xattrs: dict[str, bytes] = field(default_factory=dict)
    digest: str = ""
    chunks: tuple[str, ...] = ()


@dataclass(frozen=True)
class LayerIndex:
    diff_id: Digest  # the tar this index describes
    tar_size: int
    entries: tuple[Entry, ...]
    chunk_size: int = CHUNK_SIZE
    # Whether its files' content digests are in it. An index made as a layer is cached has
    # none (hashing every file again cost the decompress stage a quarter of its time);
    # they are added before it is published, for reads from the remote tier to check.
    digests: bool = True

    def dumps(self) -> bytes:
        import zstandard

        from pipeline.indexform import dumps

        # Level 3, zstd's default: the bench fleet's 24 indexes (1.8 MB of JSON) took 32 ms
        # at level 10, 5 ms at 3, on the cores a cold warm keeps busy, for 118 -> 135 KB.
        return zstandard.ZstdCompressor(level=3).compress(dumps(self))

    @classmethod
    def loads(cls, data: bytes, expect: Digest | None = None) -> LayerIndex:
        """Parse a stored index; BadIndex if it is unusable or describes another tar."""
        import zstandard

        from pipeline.indexform import parse

        try:
            raw = zstandard.ZstdDecompressor().decompress(data, max_output_size=MAX_INDEX_BYTES)
        except zstandard.ZstdError as e:
            raise BadIndex(f"file index: not a zstd frame within "
                              f"{MAX_INDEX_BYTES >> 20} MiB ({e})") from None
        with without_cyclic_gc():
            index = parse(raw)
        if expect is not None and index.diff_id != expect:
            raise BadIndex(f"file index describes {index.diff_id}, not {expect}")
        return index


@contextmanager
def without_cyclic_gc(*, for_good: bool = False) -> Iterator[None]:
    """The cyclic GC off for a block that makes many objects and no cycles (an index's
    entries, a merged view's nodes): its collections would only walk them, again and
    again, while they are made (a fifth of loading an index).

    `for_good`: what the block made lives until the process ends (a command that lists
    and exits). Those objects are frozen (moved where the GC never looks) before it is
    on again; else the first collection after, and the one at exit, walk them all anyway
    (a twentieth of `files -R`). Not for long-lived processes: freezing also keeps any
    cyclic garbage of that moment for good."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            if for_good:
                gc.freeze()
            gc.enable()


def entries_by_path(entries: Iterable[Entry]) -> dict[str, Entry]:
    """The last entry of each path (a tar may hold a path twice; the later one wins)."""
    return {e.path: e for e in entries}
