"""The stored form of a layer's file index (pipeline/indexform.py): what is written reads
back as the same entries, the older form still reads, and a damaged or hostile stored
index is refused as BadIndex (one message), never another exception or wrong entries."""

from __future__ import annotations

import base64
import json
import struct

import pytest
import zstandard

from pipeline import indexform
from pipeline.digest import Digest
from pipeline.fileindex import BadIndex, Entry, LayerIndex

DIFF_ID = Digest.of_bytes(b"a tar")
ENTRIES = (
    Entry("", "dir", 0o755),
    Entry("etc", "dir", 0o755, 0, 0, 1700000000.5, uname="root", gname="root"),
    Entry("etc/passwd", "file", 0o644, 0, 0, 1.0, 1234, 512, uname="root", gname="root",
          digest="ab" * 32),
    Entry("home/\u00e9l\u00e8ve\u2028x", "file", 0o4755, 2**40, 70000, -5.25, 3 << 30,
          2**40 + 512, uname="\u00e9l\u00e8ve", gname="staff", chunks=("cd" * 32, "ef" * 32),
          xattrs={"user.k": b"\x00\xff v", "security.capability": b"\x01\x02"}),
    Entry("etc/link", "symlink", 0o777, link="../x \"quoted\"\n"),
    Entry("etc/hard", "hardlink", 0o644, link="etc/passwd"),
    Entry("dev/null", "char", 0o666, devmajor=1, devminor=3),
    Entry("dev/sda", "block", 0o660, devmajor=8, devminor=0, gname="disk"),
    Entry("run/fifo", "fifo", 0o600),
    Entry("etc/gone", "whiteout"),
    Entry("var", "opaque"),
)
INDEX = LayerIndex(DIFF_ID, 4 << 30, ENTRIES, 4 << 20, digests=True)


def test_round_trip_keeps_every_field() -> None:
    assert LayerIndex.loads(INDEX.dumps(), expect=DIFF_ID) == INDEX
    empty = LayerIndex(DIFF_ID, 1024, (), digests=False)
    assert LayerIndex.loads(empty.dumps()) == empty


def test_owner_names_are_stored_once_and_shared() -> None:
    raw = indexform.dumps(INDEX)
    head = json.loads(raw.partition(b"\n")[0])
    assert head["format"] == "layerwarm-index/2"
    assert sorted(head["names"]) == sorted({"", "root", "\u00e9l\u00e8ve", "staff", "disk"})
    loaded = LayerIndex.loads(INDEX.dumps())
    roots = [e.uname for e in loaded.entries if e.uname == "root"]
    assert len(roots) == 2 and roots[0] is roots[1]


def _v1(index: LayerIndex) -> bytes:
    """The version 1 form (JSON rows), as indexes stored before version 2 are."""
    fields = ("path", "kind", "mode", "uid", "gid", "mtime", "size", "offset", "link",
              "devmajor", "devminor", "uname", "gname", "xattrs", "digest", "chunks")
    head = {"format": "layerwarm-index/1", "diff_id": str(index.diff_id),
            "tar_size": index.tar_size, "chunk_size": index.chunk_size,
            "digests": index.digests, "fields": list(fields)}
    lines = [json.dumps(head)]
    for e in index.entries:
        row = [getattr(e, f) for f in fields]
        row[13] = {k: base64.b64encode(v).decode() for k, v in e.xattrs.items()}
        row[15] = list(e.chunks)
        lines.append(json.dumps(row, ensure_ascii=False))
    return ("\n".join(lines) + "\n").encode()


def test_version_1_indexes_are_still_read() -> None:
    data = zstandard.ZstdCompressor().compress(_v1(INDEX))
    assert LayerIndex.loads(data, expect=DIFF_ID) == INDEX


def _tampered(change: object) -> bytes:
    """The stored form of INDEX with `change(head, strings, binary)` applied."""
    first, _, rest = indexform.dumps(INDEX).partition(b"\n")
    line, _, binary = rest.partition(b"\n")
    head, strings = json.loads(first), json.loads(line)
    binary = change(head, strings, bytearray(binary))  # type: ignore[operator]
    raw = json.dumps(head).encode() + b"\n" + json.dumps(strings).encode() + b"\n" + binary
    return zstandard.ZstdCompressor().compress(raw)


N = len(ENTRIES)
OWNERS = N + 8 * 8 * N  # where the user column starts: after the kinds and 8 columns


def _set(at: int, value: int, fmt: str = "<q"):  # noqa: ANN202
    def change(head: dict, strings: list, binary: bytearray) -> bytes:
        struct.pack_into(fmt, binary, at, value)
        return bytes(binary)
    return change


HOSTILE = {
    "binary part cut short": lambda h, s, b: bytes(b[:-1]),
    "binary part too long": lambda h, s, b: bytes(b) + b"\0",
    "more entries claimed": lambda h, s, b: (h.update(count=N + 1), bytes(b))[1],
    "negative count": lambda h, s, b: (h.update(count=-1), bytes(b))[1],
    "a path column short": lambda h, s, b: (s[0].pop(), bytes(b))[1],
    "a path that is a number": lambda h, s, b: (s[0].__setitem__(1, 7), bytes(b))[1],
    "two string columns": lambda h, s, b: (s.pop(), bytes(b))[1],
    "an unknown kind": lambda h, s, b: bytes([200]) + bytes(b[1:]),
    "an owner past the name table": _set(OWNERS, 99),
    "a negative owner": _set(OWNERS + 8, -1),
    "names not strings": lambda h, s, b: (h.update(names=[1, 2]), bytes(b))[1],
    "xattrs of a missing entry": lambda h, s, b: (h.update(xattrs={str(N): {}}), bytes(b))[1],
    "xattrs not base64": lambda h, s, b: (h.update(xattrs={"1": {"k": "!!"}}), bytes(b))[1],
    "chunks not strings": lambda h, s, b: (h.update(chunks={"1": [1]}), bytes(b))[1],
    "chunks by a word": lambda h, s, b: (h.update(chunks={"x": []}), bytes(b))[1],
    "digests not a bool": lambda h, s, b: (h.update(digests="yes"), bytes(b))[1],
    "another format": lambda h, s, b: (h.update(format="layerwarm-index/9"), bytes(b))[1],
    "no diff_id": lambda h, s, b: (h.pop("diff_id"), bytes(b))[1],
}


@pytest.mark.parametrize("name", HOSTILE)
def test_a_damaged_index_is_refused_with_one_message(name: str) -> None:
    with pytest.raises(BadIndex, match=r"^file index: "):
        LayerIndex.loads(_tampered(HOSTILE[name]))


@pytest.mark.parametrize("raw", [b"", b"\n", b"[]\n", b"not json", b"{\"format\": 1}\n",
                                 b"\xff\xfe\n", b"{}"])
def test_garbage_is_refused(raw: bytes) -> None:
    with pytest.raises(BadIndex, match=r"^file index: "):
        LayerIndex.loads(zstandard.ZstdCompressor().compress(raw))


def test_an_index_of_another_layer_is_refused() -> None:
    with pytest.raises(BadIndex, match="describes"):
        LayerIndex.loads(INDEX.dumps(), expect=Digest.of_bytes(b"another tar"))
