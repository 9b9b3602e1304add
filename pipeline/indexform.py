"""The stored form of a layer's file index (inside one zstd frame; pipeline/fileindex.py).

Version 2, the form written now, is column by column:

    line 1   a JSON header: format, diff_id, tar size, chunk size, whether content
             digests are in it, the entry count, the table of owner names, and the
             entries that have xattrs or chunk digests (few), by entry number
    line 2   a JSON array of three string columns: paths, link targets, digests
    the rest binary columns, one value per entry in tar order: the kind (one byte, its
             position in KINDS), then little-endian 8-byte mode, uid, gid, mtime (a
             double), size, offset, devmajor, devminor, user and group (positions in the
             name table)

Why: loading is most of a listing's start. Rows of JSON made a list, a dict and a string
per field of every entry and parsed every number from text; columns come back through
C-level calls (json for the strings, array.frombytes for the numbers, one shared string
per owner name), in less than half the time for a base image, at two thirds of the size.
It is still written in one pass, and a reader meeting an unknown format refuses it.

Version 1 (a JSON header, then one JSON array per entry) is still read: indexes stored
before version 2, on disks and in remote tiers, stay usable.
"""

from __future__ import annotations

import base64
import json
import sys
from array import array
from typing import Any

from pipeline.digest import Digest
from pipeline.fileindex import KINDS, BadIndex, Entry, LayerIndex

FORMAT = "layerwarm-index/2"
FORMAT_V1 = "layerwarm-index/1"

# The numeric columns after the kinds, in stored order, each 8 bytes per entry.
_NUMBERS = (("mode", "q"), ("uid", "q"), ("gid", "q"), ("mtime", "d"), ("size", "q"),
            ("offset", "q"), ("devmajor", "q"), ("devminor", "q"), ("uname", "q"),
            ("gname", "q"))
_KIND_NUMBER = {k: i for i, k in enumerate(KINDS)}
_SWAP = sys.byteorder != "little"  # stored little-endian whatever the machine


def dumps(index: LayerIndex) -> bytes:
    """The uncompressed stored form (version 2) of `index`."""
    es = index.entries
    names: dict[str, int] = {}
    head = {
        "format": FORMAT, "diff_id": str(index.diff_id), "tar_size": index.tar_size,
        "chunk_size": index.chunk_size, "digests": index.digests, "count": len(es),
        "names": names,  # filled below, dumped as a list
        "xattrs": {str(i): {k: base64.b64encode(v).decode() for k, v in e.xattrs.items()}
                   for i, e in enumerate(es) if e.xattrs},
        "chunks": {str(i): list(e.chunks) for i, e in enumerate(es) if e.chunks},
    }
    columns: dict[str, list[Any]] = {
        "mode": [e.mode for e in es], "uid": [e.uid for e in es], "gid": [e.gid for e in es],
        "mtime": [e.mtime for e in es], "size": [e.size for e in es],
        "offset": [e.offset for e in es], "devmajor": [e.devmajor for e in es],
        "devminor": [e.devminor for e in es],
        "uname": [names.setdefault(e.uname, len(names)) for e in es],
        "gname": [names.setdefault(e.gname, len(names)) for e in es],
    }
    head["names"] = list(names)
    binary = [bytes(_KIND_NUMBER[e.kind] for e in es)]
    for name, code in _NUMBERS:
        values = array(code, columns[name])
        if _SWAP:
            values.byteswap()
        binary.append(values.tobytes())
    strings = [[e.path for e in es], [e.link for e in es], [e.digest for e in es]]
    return b"".join([json.dumps(head, separators=(",", ":")).encode(), b"\n",
                     json.dumps(strings, separators=(",", ":"), ensure_ascii=False).encode(),
                     b"\n", *binary])


def parse(raw: bytes) -> LayerIndex:
    """The index a stored form (version 2 or 1) holds; BadIndex if it is not one."""
    try:
        first, _, rest = raw.partition(b"\n")
        head = json.loads(first)
        if type(head) is not dict:
            raise ValueError("the header is not an object")
        digests = head.get("digests", True)  # a version 1 index from before the field
        if type(digests) is not bool:
            raise ValueError(f"digests: {digests!r}")
        if head.get("format") == FORMAT:
            entries = _columns(head, rest)
        elif head.get("format") == FORMAT_V1 and head.get("fields") == list(_V1_FIELDS):
            entries = _rows(rest)
        else:
            raise BadIndex(f"file index: format {head.get('format')!r}, want {FORMAT!r}")
        return LayerIndex(Digest.parse(head["diff_id"]), int(head["tar_size"]), entries,
                          int(head["chunk_size"]), digests)
    except BadIndex:
        raise
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        # (UnicodeDecodeError and json's errors are ValueErrors)
        raise BadIndex(f"file index: malformed ({type(e).__name__}: {e})") from None


def _columns(head: dict[str, Any], rest: bytes) -> tuple[Entry, ...]:
    n = head["count"]
    if type(n) is not int or n < 0:
        raise ValueError(f"count {n!r}")
    line, _, binary = rest.partition(b"\n")
    strings = json.loads(line)
    if type(strings) is not list or len(strings) != 3:
        raise ValueError("not three string columns")
    for column in strings:
        if type(column) is not list or len(column) != n or set(map(type, column)) - {str}:
            raise ValueError(f"a string column that is not {n} strings")
    paths, links, digests = strings
    if len(binary) != n * (1 + 8 * len(_NUMBERS)):
        raise ValueError(f"{len(binary)} bytes of numbers for {n} entries")
    if n and max(binary[:n]) >= len(KINDS):
        raise ValueError("an unknown kind")
    kinds = list(map(KINDS.__getitem__, binary[:n]))
    numbers: dict[str, list[Any]] = {}
    at = n
    for name, code in _NUMBERS:
        values = array(code)
        values.frombytes(binary[at:at + 8 * n])
        if _SWAP:
            values.byteswap()
        numbers[name] = values.tolist()
        at += 8 * n
    names = head["names"]
    if type(names) is not list or set(map(type, names)) - {str}:
        raise ValueError("the name table is not a list of strings")
    owners = numbers["uname"] + numbers["gname"]
    if owners and (min(owners) < 0 or max(owners) >= len(names)):
        raise ValueError("an owner name out of the table")
    xattrs: list[dict[str, bytes]] = [{} for _ in range(n)]
    for i, pairs in _sparse(head, "xattrs", n, dict):
        xattrs[i] = {str(k): base64.b64decode(v, validate=True) for k, v in pairs.items()}
    chunks: list[tuple[str, ...]] = [()] * n
    for i, sums in _sparse(head, "chunks", n, list):
        if set(map(type, sums)) - {str}:
            raise ValueError("a chunk digest that is not a string")
        chunks[i] = tuple(sums)
    return tuple(map(
        Entry, paths, kinds, numbers["mode"], numbers["uid"], numbers["gid"],
        numbers["mtime"], numbers["size"], numbers["offset"], links, numbers["devmajor"],
        numbers["devminor"], map(names.__getitem__, numbers["uname"]),
        map(names.__getitem__, numbers["gname"]), xattrs, digests, chunks))


def _sparse(head: dict[str, Any], key: str, n: int, kind: type) -> list[tuple[int, Any]]:
    """The (entry number, value) pairs of a header's by-entry table, each checked."""
    table = head.get(key, {})
    if type(table) is not dict:
        raise ValueError(f"{key} is not an object")
    out = []
    for k, v in table.items():
        i = int(k)
        if not 0 <= i < n or type(v) is not kind:
            raise ValueError(f"{key} of entry {k!r}")
        out.append((i, v))
    return out


# Version 1: one JSON array per entry, these fields in this order (xattr values base64).
_V1_FIELDS = ("path", "kind", "mode", "uid", "gid", "mtime", "size", "offset", "link",
              "devmajor", "devminor", "uname", "gname", "xattrs", "digest", "chunks")
# The JSON types each field may have, in that order (mtime may be written as an integer).
_V1_TYPES: tuple[frozenset[type], ...] = tuple(frozenset(t) for t in (
    {str}, {str}, {int}, {int}, {int}, {int, float}, {int}, {int}, {str}, {int}, {int},
    {str}, {str}, {dict}, {str}, {list}))


def _rows(body: bytes) -> tuple[Entry, ...]:
    """Entries of version 1 rows, every field of the type the Entry says, or ValueError.

    The lines are parsed as one JSON array, joined as bytes (newlines occur only between
    rows: JSON escapes them, and nothing else may split them); then checked column by
    column with C-level passes (set, map, zip), not a Python loop over every field."""
    rows = json.loads(b"[" + body.rstrip(b"\n").replace(b"\n", b",") + b"]")
    n = len(_V1_FIELDS)
    if set(map(type, rows)) - {list} or set(map(len, rows)) - {n}:
        raise ValueError(f"an entry that is not a list of {n} fields")
    columns = list(zip(*rows, strict=True)) if rows else [() for _ in _V1_FIELDS]
    for name, allowed, column in zip(_V1_FIELDS, _V1_TYPES, columns, strict=True):
        if bad := set(map(type, column)) - allowed:
            raise ValueError(f"field {name!r} of type {sorted(t.__name__ for t in bad)}")
    if bad := set(columns[1]) - set(KINDS):
        raise ValueError(f"unknown kind {sorted(bad)[0]!r}")
    chunks = [tuple(c) if c else () for c in columns[15]]
    if set(map(type, (d for c in chunks for d in c))) - {str}:
        raise ValueError("a chunk digest that is not a string")
    xattrs = [{str(k): base64.b64decode(v, validate=True) for k, v in x.items()} if x else x
              for x in columns[13]]
    return tuple(map(Entry, *columns[:13], xattrs, columns[14], chunks))
