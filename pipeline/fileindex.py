"""A layer's file index: every entry of its tar, where its data lies, and content digests.

Built while the decompress stage streams the tar (pipeline/tarindex.py), stored beside the
layer and published with it, and read by the merged image view (pipeline/imageview.py) so
that a file can be listed, and its bytes read at their offset in the tar, without reading
the rest of the layer.

Stored form: one zstd frame holding JSON. A header object names the format, the diff_id
the index describes, the tar's size, the chunk size and the entry fields; then one JSON
array per entry, in tar order, with the fields in that order. Why this form: the stdlib
reads it fast (a base image's ten thousand entries load in milliseconds), it is written in
one pass as the tar streams by, it compresses to a few tens of bytes an entry (paths and
owners repeat), and a reader that meets an unknown format refuses it instead of guessing.
"""

from __future__ import annotations

import gc
import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

from pipeline.digest import Digest
from pipeline.errors import PermanentError

FORMAT = "layerwarm-index/1"
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


# The order of an entry's fields in the stored form (xattr values are base64).
FIELDS = ("path", "kind", "mode", "uid", "gid", "mtime", "size", "offset", "link",
          "devmajor", "devminor", "uname", "gname", "xattrs", "digest", "chunks")


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

        return zstandard.ZstdCompressor(level=10).compress(_to_json(self))

    @classmethod
    def loads(cls, data: bytes, expect: Digest | None = None) -> LayerIndex:
        """Parse a stored index; BadIndex if it is unusable or describes another tar."""
        import zstandard

        try:
            raw = zstandard.ZstdDecompressor().decompress(data, max_output_size=MAX_INDEX_BYTES)
        except zstandard.ZstdError as e:
            raise BadIndex(f"file index: not a zstd frame within "
                              f"{MAX_INDEX_BYTES >> 20} MiB ({e})") from None
        with without_cyclic_gc():
            index = _from_json(raw)
        if expect is not None and index.diff_id != expect:
            raise BadIndex(f"file index describes {index.diff_id}, not {expect}")
        return index


def _to_json(index: LayerIndex) -> bytes:
    import base64

    head = {"format": FORMAT, "diff_id": str(index.diff_id), "tar_size": index.tar_size,
            "chunk_size": index.chunk_size, "digests": index.digests, "fields": list(FIELDS)}
    lines = [json.dumps(head, separators=(",", ":"))]
    for e in index.entries:
        xattrs = {k: base64.b64encode(v).decode() for k, v in e.xattrs.items()}
        lines.append(json.dumps(
            [e.path, e.kind, e.mode, e.uid, e.gid, e.mtime, e.size, e.offset, e.link,
             e.devmajor, e.devminor, e.uname, e.gname, xattrs, e.digest, list(e.chunks)],
            separators=(",", ":"), ensure_ascii=False))
    return ("\n".join(lines) + "\n").encode()


def _from_json(raw: bytes) -> LayerIndex:
    try:
        first, _, body = raw.partition(b"\n")
        head = json.loads(first)
        if head.get("format") != FORMAT or head.get("fields") != list(FIELDS):
            raise BadIndex(f"file index: format {head.get('format')!r}, want {FORMAT!r}")
        # The entries' lines as one JSON array, one parse (twice as fast as a parse per
        # line); joined as bytes: newlines never occur inside JSON text, only between rows.
        rows = json.loads(b"[" + body.rstrip(b"\n").replace(b"\n", b",") + b"]")
        digests = head.get("digests", True)  # an index from before the field had them
        if type(digests) is not bool:
            raise ValueError(f"digests: {digests!r}")
        return LayerIndex(Digest.parse(head["diff_id"]), int(head["tar_size"]),
                          _entries(rows), int(head["chunk_size"]), digests)
    except BadIndex:
        raise
    except (ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError) as e:
        raise BadIndex(f"file index: malformed ({type(e).__name__}: {e})") from None


# The JSON types each field may have, in FIELDS order (mtime may be written as an integer).
_TYPES: tuple[frozenset[type], ...] = tuple(frozenset(t) for t in (
    {str}, {str}, {int}, {int}, {int}, {int, float}, {int}, {int}, {str}, {int}, {int},
    {str}, {str}, {dict}, {str}, {list}))


def _entries(rows: list) -> tuple[Entry, ...]:
    """Entries of parsed rows, every field of the type the Entry says, or ValueError.

    Checked column by column and built with no conversion, each step a C-level pass (set,
    map, zip) rather than a Python loop over ten thousand rows: a base image's entries
    load in a few tens of milliseconds (field-by-field conversion took 150)."""
    import base64

    n = len(FIELDS)
    if set(map(type, rows)) - {list} or set(map(len, rows)) - {n}:
        raise ValueError(f"an entry that is not a list of {n} fields")
    columns = list(zip(*rows, strict=True)) if rows else [() for _ in FIELDS]
    for name, allowed, column in zip(FIELDS, _TYPES, columns, strict=True):
        if bad := set(map(type, column)) - allowed:
            raise ValueError(f"field {name!r} of type {sorted(t.__name__ for t in bad)}")
    if bad := set(columns[1]) - set(KINDS):
        raise ValueError(f"unknown kind {sorted(bad)[0]!r}")
    chunks = [tuple(c) if c else () for c in columns[15]]
    if set(map(type, (d for c in chunks for d in c))) - {str}:
        raise ValueError("a chunk digest that is not a string")
    xattrs = [{str(k): base64.b64decode(v, validate=True) for k, v in x.items()} if x else x
              for x in columns[13]]  # values are base64
    return tuple(map(Entry, *columns[:13], xattrs, columns[14], chunks))


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
