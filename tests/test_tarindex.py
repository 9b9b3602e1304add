"""The streaming tar indexer against what Python's tarfile reads from the same bytes.

Each tar is fed in pieces of 1, 7, 513 bytes, 1 MiB and whole: the index must not depend
on where the decompress stage happens to cut its chunks.
"""

from __future__ import annotations

import base64
import io
import random
import tarfile

import pytest

from pipeline.digest import Digest
from pipeline.errors import PermanentError
from pipeline.fileindex import LayerIndex, entries_by_path
from pipeline.tarindex import (
    MAX_EXTENSION,
    MAX_REFUSED_SHOWN,
    BadTar,
    TarIndexer,
    UnsupportedEntry,
)
from tests.support.tarindex_ref import assert_content

CHUNK = 4096  # a small chunk_size keeps the per-chunk digests cheap to test
SPLITS = [1, 7, 513, 1 << 20, None, -1]  # None: the whole tar in one feed; -1: random
DIFF_ID = Digest.of_bytes(b"a layer")
FORMATS = {"gnu": tarfile.GNU_FORMAT, "pax": tarfile.PAX_FORMAT, "ustar": tarfile.USTAR_FORMAT}
KIND_OF = {tarfile.REGTYPE: "file", tarfile.AREGTYPE: "file", tarfile.CONTTYPE: "file",
           tarfile.LNKTYPE: "hardlink", tarfile.SYMTYPE: "symlink", tarfile.CHRTYPE: "char",
           tarfile.BLKTYPE: "block", tarfile.DIRTYPE: "dir", tarfile.FIFOTYPE: "fifo"}


# -- building and feeding ----------------------------------------------------------------

def member(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", **attrs) -> tuple:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.size = len(data) if kind == tarfile.REGTYPE else 0
    ti.mode = attrs.pop("mode", 0o644)
    ti.uid, ti.gid = attrs.pop("uid", 1000), attrs.pop("gid", 1001)
    ti.uname, ti.gname = attrs.pop("uname", "alice"), attrs.pop("gname", "staff")
    ti.mtime = attrs.pop("mtime", 1_700_000_000)
    for key, value in attrs.items():
        setattr(ti, key, value)
    return ti, data


def build(members: list[tuple], fmt: int = tarfile.PAX_FORMAT, **kwargs) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt, **kwargs) as tar:
        for ti, data in members:
            tar.addfile(ti, io.BytesIO(data) if ti.isreg() else None)
    return out.getvalue()


def feed(tar: bytes, split: int | None, chunk_size: int = CHUNK) -> tuple[TarIndexer, LayerIndex]:
    indexer = TarIndexer(DIFF_ID, chunk_size=chunk_size)
    view, rng, i = memoryview(tar), random.Random(len(tar)), 0
    while i < len(tar):
        step = (split or len(tar)) if split != -1 else rng.randint(1, 3000)
        # memoryviews and bytes, as the decompress stage may hand either
        indexer.feed(view[i:i + step] if i % 2 else bytes(view[i:i + step]))
        i += step
    return indexer, indexer.finish()


def norm(name: str) -> str:
    return "/".join(p for p in name.split("/") if p not in ("", "."))


def assert_matches_tarfile(tar: bytes, index: LayerIndex) -> None:
    """Every entry is the member tarfile reads, field by field, and its bytes hash right."""
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        members = tf.getmembers()
    assert len(index.entries) == len(members)
    for e, ti in zip(index.entries, members, strict=True):
        kind = KIND_OF[ti.type]
        assert (e.path, e.kind) == (norm(ti.name), kind)
        assert e.mode == ti.mode & 0o7777
        assert (e.uid, e.gid, e.uname, e.gname) == (ti.uid, ti.gid, ti.uname, ti.gname)
        assert e.mtime == ti.mtime
        if kind == "file":
            assert (e.size, e.offset) == (ti.size, ti.offset_data)
        else:
            assert (e.size, e.offset, e.digest, e.chunks) == (0, 0, "", ())
        if kind == "hardlink":
            assert e.link == norm(ti.linkname)
        elif kind == "symlink":
            assert e.link == ti.linkname
        else:
            assert e.link == ""
        if kind in ("char", "block"):
            assert (e.devmajor, e.devminor) == (ti.devmajor, ti.devminor)
        else:
            assert (e.devmajor, e.devminor) == (0, 0)
        xattrs = {k[13:]: v.encode("utf-8", "surrogateescape")
                  for k, v in ti.pax_headers.items() if k.startswith("SCHILY.xattr.")}
        assert e.xattrs == xattrs
    assert_content(tar, index)


def raw_header(name: bytes, kind: bytes, size: int = 0, magic: bytes = b"ustar\x0000",
               link: bytes = b"", mode: int = 0o644) -> bytes:
    """A header made by hand, for what tarfile will not write (v7, sparse, odd types)."""
    h = bytearray(512)
    h[0:len(name)] = name
    h[100:108] = b"%07o\0" % mode
    h[108:116] = b"%07o\0" % 1
    h[116:124] = b"%07o\0" % 2
    h[124:136] = b"%011o\0" % size
    h[136:148] = b"%011o\0" % 1_600_000_000
    h[156:157] = kind
    h[157:157 + len(link)] = link
    h[257:265] = magic
    return with_checksum(h)


def with_checksum(header: bytes | bytearray) -> bytes:
    h = bytearray(header)
    h[148:156] = b" " * 8
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


def padded(data: bytes) -> bytes:
    return data + bytes(-len(data) % 512)


# -- every format, every split -----------------------------------------------------------

LONG_DIR = "d" * 60 + "/" + "e" * 60  # 121 chars: over ustar's 100-byte name field
LONG_255 = "/".join(["x" * 50] * 6)  # 305 chars: over ustar's prefix + name too
RANDOM = random.Random(14)


def rich_members(fmt: str) -> list[tuple]:
    big = RANDOM.randbytes(int(2.5 * CHUNK))
    exact = RANDOM.randbytes(CHUNK)
    ms = [
        member("./", tarfile.DIRTYPE, mode=0o755),
        member("./etc", tarfile.DIRTYPE, mode=0o755),
        member("./etc/hosts", data=b"127.0.0.1 localhost\n"),
        member("etc/empty", data=b""),
        member("bin/setuid", data=b"#!/bin/sh\n", mode=0o4755),
        member("big", data=big),
        member("exact", data=exact),
        member("small", data=b"x" * 511),
        member("ln", tarfile.LNKTYPE, linkname="./etc/hosts"),
        member("sym", tarfile.SYMTYPE, linkname="../../etc/hosts"),
        member("abs-sym", tarfile.SYMTYPE, linkname="/etc/hosts"),
        member("dev/null", tarfile.CHRTYPE, mode=0o666, devmajor=1, devminor=3),
        member("dev/sda", tarfile.BLKTYPE, mode=0o660, devmajor=8, devminor=0),
        member("run/fifo", tarfile.FIFOTYPE),
        member("/absolute/file", data=b"abs"),
        member("dup", data=b"first"),
        member("dup", data=b"second"),
        member(LONG_DIR + "/f", data=b"in a long directory"),  # ustar: prefix field
    ]
    if fmt != "ustar":  # names and links ustar cannot hold
        ms += [
            member(LONG_255, data=b"a very long name"),
            member("long-ln", tarfile.LNKTYPE, linkname=LONG_255),
            member("long-sym", tarfile.SYMTYPE, linkname="/" + LONG_255),
            member("big-ids", data=b"ids", uid=3_000_000, gid=4_000_000),
        ]
    if fmt == "pax":
        ms += [
            member("xattrs", data=b"caps",
                   pax_headers={"SCHILY.xattr.security.capability": "\x01\x02",
                                "SCHILY.xattr.user.note": "héllo"}),
            member("frac-mtime", data=b"t", mtime=1_700_000_000.25),
            member("ünïcode/ñame", data=b"utf-8 name"),
        ]
    return ms


@pytest.mark.parametrize("split", SPLITS, ids=lambda s: f"split{s}")
@pytest.mark.parametrize("fmt", FORMATS)
def test_index_matches_tarfile(fmt: str, split: int | None) -> None:
    tar = build(rich_members(fmt), FORMATS[fmt])
    indexer, index = feed(tar, split)
    assert indexer.refused == [] and indexer.refused_count == 0
    assert_matches_tarfile(tar, index)
    paths = [e.path for e in index.entries]
    assert paths[:3] == ["", "etc", "etc/hosts"]  # "./" is the root: path "", a dir
    assert "absolute/file" in paths
    by_path = entries_by_path(index.entries)
    assert len(by_path["big"].chunks) == 3 and len(by_path["exact"].chunks) == 0
    assert by_path["ln"].link == "etc/hosts"
    assert by_path["sym"].link == "../../etc/hosts"  # kept as written
    assert by_path["dup"].offset == max(e.offset for e in index.entries if e.path == "dup")


def test_pax_xattrs_and_large_numbers() -> None:
    tar = build(rich_members("pax"))
    index = feed(tar, 7)[1]
    by_path = entries_by_path(index.entries)
    assert by_path["xattrs"].xattrs == {"security.capability": b"\x01\x02",
                                        "user.note": "héllo".encode()}
    assert by_path["frac-mtime"].mtime == 1_700_000_000.25
    assert (by_path["big-ids"].uid, by_path["big-ids"].gid) == (3_000_000, 4_000_000)
    assert by_path[LONG_255].size == len(b"a very long name")
    assert by_path["long-ln"].link == LONG_255


def test_gnu_base256_numbers() -> None:
    tar = build([member("f", data=b"1", uid=3_000_000, gid=4_000_000)], tarfile.GNU_FORMAT)
    assert tar[108] == 0o200  # the uid really is base-256 in this tar
    entry = feed(tar, None)[1].entries[0]
    assert (entry.uid, entry.gid) == (3_000_000, 4_000_000)


def test_libarchive_xattrs() -> None:
    value = base64.b64encode(b"\x00\xffbinary").decode().rstrip("=")  # libarchive: unpadded
    tar = build([member("f", data=b"1", pax_headers={
        "LIBARCHIVE.xattr.user.%41b": value,
        "LIBARCHIVE.xattr.user.bad": "not base64!"})])
    indexer, index = feed(tar, 513)
    assert index.entries[0].xattrs == {"user.Ab": b"\x00\xffbinary"}
    assert indexer.refused_count == 1 and "user.bad" in indexer.refused[0]


def test_pax_global_header_applies_to_later_entries() -> None:
    tar = build([member("a", data=b"1"),
                 member("b", data=b"2", pax_headers={"uname": "own"})],
                pax_headers={"uname": "global", "SCHILY.xattr.user.g": "1"})
    assert b"g" == tar[156:157]
    index = feed(tar, 1)[1]
    assert [(e.path, e.uname, e.xattrs) for e in index.entries] == [
        ("a", "global", {"user.g": b"1"}), ("b", "own", {"user.g": b"1"})]
    assert_content(tar, index)


def test_old_v7_headers() -> None:
    tar = (raw_header(b"olddir/", b"\0", magic=bytes(8))
           + raw_header(b"olddir/file", b"\0", size=5, magic=bytes(8)) + padded(b"hello")
           + raw_header(b"olddir/link", b"1", link=b"olddir/file", magic=bytes(8))
           + bytes(1024))
    index = feed(tar, 7)[1]
    assert [(e.path, e.kind, e.size, e.link) for e in index.entries] == [
        ("olddir", "dir", 0, ""), ("olddir/file", "file", 5, ""),
        ("olddir/link", "hardlink", 0, "olddir/file")]
    assert_content(tar, index)


def test_empty_layer_and_end_of_archive() -> None:
    assert feed(bytes(1024), 1)[1].entries == ()
    tar = build([member("f", data=b"data")])
    # A missing second zero block, no zero block at all, and data after the end: fine.
    end = 1024  # a header, one block of data: then the zero blocks
    assert tar[end:end + 1024] == bytes(1024) and tar[end - 512:end] != bytes(512)
    for variant in (tar[:end + 512], tar[:end], tar + b"garbage after the end"):
        indexer, index = feed(variant, 7)
        assert [e.path for e in index.entries] == ["f"]
        assert index.tar_size == len(variant)


# -- whiteouts and hostile names --------------------------------------------------------

def test_whiteouts_and_opaque_markers() -> None:
    tar = build([member("a", tarfile.DIRTYPE), member("a/.wh.b"), member("a/.wh..wh..opq"),
                 member(".wh..wh..opq"), member("./.wh.top"),
                 member(".wh..wh.plnk", tarfile.DIRTYPE),
                 member(".wh..wh.plnk/1234.56", data=b"aufs keeps hardlinked files here"),
                 member("a/c", data=b"kept"),
                 member("a/linked", tarfile.LNKTYPE, linkname=".wh..wh.plnk/1234.56")],
                tarfile.GNU_FORMAT)
    indexer, index = feed(tar, 513)
    assert [(e.path, e.kind) for e in index.entries] == [
        ("a", "dir"), ("a/b", "whiteout"), ("a", "opaque"), ("", "opaque"),
        ("top", "whiteout"), ("a/c", "file"), ("a/linked", "file")]
    assert indexer.refused_count == 2
    assert all("aufs" in r for r in indexer.refused)
    # A hardlink into aufs's link store is its file: the data at the store's offset.
    linked = index.entries[-1]
    assert tar[linked.offset:linked.offset + linked.size] == b"aufs keeps hardlinked files here"
    assert_content(tar, index)


def test_hostile_names_are_left_out_not_raised() -> None:
    tar = build([
        member("../escape", data=b"evil"),
        member("a/../../b", data=b"evil"),
        member("ok/./x//y/", tarfile.DIRTYPE),
        member("./ok/file", data=b"good"),
        member("hl", tarfile.LNKTYPE, linkname="../x"),
        member("hl-abs", tarfile.LNKTYPE, linkname="/ok/file"),
        member("nul", data=b"evil", pax_headers={"path": "a\x00b"}),
        member(".", tarfile.REGTYPE, data=b"a file named the root"),
        member("ok/.wh.", data=b""),
        member("deep/" + "d/" * 2100 + "f", data=b"too long"),
        member("last", data=b"still read after all of them"),
    ])
    for split in SPLITS:
        indexer, index = feed(tar, split)
        assert [(e.path, e.kind, e.link) for e in index.entries] == [
            ("ok/x/y", "dir", ""), ("ok/file", "file", ""),
            ("hl-abs", "hardlink", "ok/file"), ("last", "file", "")]
        assert indexer.refused_count == 7
        assert any("'../escape'" in r and ".." in r for r in indexer.refused)
        assert any("hardlink target '../x'" in r for r in indexer.refused)
        assert any("NUL" in r for r in indexer.refused)
        assert any("longer than 4096" in r for r in indexer.refused)
        assert_content(tar, index)


def test_refused_list_is_capped_but_counted() -> None:
    tar = build([member(f"../x{i}") for i in range(MAX_REFUSED_SHOWN + 50)])
    indexer, index = feed(tar, None)
    assert index.entries == ()
    assert len(indexer.refused) == MAX_REFUSED_SHOWN
    assert indexer.refused_count == MAX_REFUSED_SHOWN + 50


# -- the stored form ---------------------------------------------------------------------

def test_dumps_loads_round_trip() -> None:
    tar = build(rich_members("pax"))
    index = feed(tar, 513)[1]
    assert LayerIndex.loads(index.dumps(), expect=DIFF_ID) == index


def test_names_with_unicode_line_breaks_survive_the_stored_form() -> None:
    # JSON leaves U+2028, NEL and the like unescaped; only a real newline ends an entry.
    names = ["a\u2028b", "c\x85d", "e\x1cf", "g\u2029h"]
    tar = build([member(n, data=n.encode()) for n in names])
    index = feed(tar, None)[1]
    loaded = LayerIndex.loads(index.dumps(), expect=DIFF_ID)
    assert [e.path for e in loaded.entries] == names
    assert loaded == index


# -- tars that cannot be indexed: a clear error, never another exception, never a hang -----

def test_corrupt_header_checksum() -> None:
    tar = bytearray(build([member("a", data=b"1"), member("b", data=b"2")], tarfile.GNU_FORMAT))
    tar[1024] ^= 0x01  # the second header's name
    with pytest.raises(BadTar, match=r"offset 1024: header checksum mismatch"):
        feed(bytes(tar), 7)


@pytest.mark.parametrize("key", ["uid", "gid", "size"])
def test_pax_numbers_past_int64_are_refused(key: str) -> None:
    # Go's archive/tar (containerd) reads them as int64; the stored index keeps int64.
    ok = build([member("a", pax_headers={key: str((1 << 63) - 1)} if key != "size" else {})])
    index = feed(ok, None)[1]
    assert LayerIndex.loads(index.dumps()) == index and index.entries[0].path == "a"
    tar = build([member("a", pax_headers={key: str(1 << 63)})])
    with pytest.raises(BadTar, match=f"PAX {key}=b'9223372036854775808' is out of range"):
        feed(tar, None)


@pytest.mark.parametrize("cut", [512 + 100, 1536 + 100, 1024, 512 - 1, 700])
def test_truncated_tar(cut: int) -> None:
    tar = build([member("a", data=b"x" * 600), member("b", data=b"y")])
    # tarfile's PAX format puts no x header here: "a" is at 0, its data at 512..1112.
    with pytest.raises(BadTar, match="truncated"):
        feed(tar[:cut], 7)


def test_truncated_after_extension_header() -> None:
    tar = build([member("n" * 300, data=b"1")], tarfile.GNU_FORMAT)
    with pytest.raises(BadTar, match="extension header"):
        feed(tar[:1024], 1)


def test_extension_header_over_the_cap() -> None:
    tar = build([member("f", data=b"1", pax_headers={"comment": "c" * MAX_EXTENSION})])
    indexer = TarIndexer(DIFF_ID)
    with pytest.raises(BadTar, match="at most 1 MiB"):
        indexer.feed(tar[:512])  # refused from its header: its data is never buffered
    with pytest.raises(BadTar):  # and it stays failed
        indexer.finish()


def test_gnu_sparse_and_unknown_types_are_refused() -> None:
    for kind, what in ((b"S", "sparse"), (b"V", "type 'V'"), (b"D", "type 'D'")):
        tar = raw_header(b"dir/thing", kind, size=0) + bytes(1024)
        with pytest.raises(UnsupportedEntry, match=f"'dir/thing'.*{what}"):
            feed(tar, 7)
    tar = build([member("GNUSparseFile.0/f", data=b"map",
                        pax_headers={"GNU.sparse.major": "1", "GNU.sparse.minor": "0",
                                     "GNU.sparse.name": "real/f"})])
    with pytest.raises(UnsupportedEntry, match="'real/f' .*sparse"):
        feed(tar, None)


def test_garbage_is_a_bad_tar() -> None:
    with pytest.raises(BadTar):
        feed(random.Random(1).randbytes(5000), 513)


def test_mutated_tars_raise_only_bad_tar() -> None:
    """Random bytes flipped in headers: the index or a BadTar, nothing else, quickly."""
    base = build(rich_members("pax"), tarfile.PAX_FORMAT)
    headers = [i for i in range(0, len(base), 512)]
    rng = random.Random(5)
    for _ in range(300):
        tar = bytearray(base)
        at = rng.choice(headers)
        for _ in range(rng.randint(1, 4)):
            tar[at + rng.randrange(512)] = rng.randrange(256)
        if rng.random() < 0.7:  # a valid checksum, so the parser reads the mutated fields
            tar[at:at + 512] = with_checksum(tar[at:at + 512])
        try:
            feed(bytes(tar), rng.choice([7, 513, None]))
        except BadTar:
            pass
        except PermanentError as e:  # pragma: no cover - a failure, shown with its type
            pytest.fail(f"unexpected {type(e).__name__}: {e}")


def test_many_entries_in_linear_time() -> None:
    tar = build([member(f"d/{i}", data=b"") for i in range(20_000)], tarfile.GNU_FORMAT)
    indexer, index = feed(tar, 1 << 20)
    assert len(index.entries) == 20_000


@pytest.mark.parametrize("split", [1 << 20, 300_000, None])
def test_large_files_chunk_digests(split: int | None) -> None:
    """Files of several chunks, cut anywhere: per-chunk digests, none of the whole."""
    data = RANDOM.randbytes(3 << 20)
    tar = build([member("three", data=data), member("two-and-a-bit", data=data[:(2 << 20) + 1]),
                 member("one", data=data[:1 << 20])])
    index = feed(tar, split, chunk_size=1 << 20)[1]
    assert [len(e.chunks) for e in index.entries] == [3, 3, 0]
    assert_content(tar, index)


def test_signed_header_checksum_of_old_tars() -> None:
    """Some old tars summed header bytes as signed chars: still a valid header."""
    h = bytearray(raw_header("café".encode(), b"0", size=2))
    h[148:156] = b" " * 8
    signed = sum(b - 256 if b >= 128 else b for b in h)
    h[148:156] = b"%06o\0 " % signed
    index = feed(bytes(h) + padded(b"hi") + bytes(1024), 7)[1]
    assert [(e.path, e.size) for e in index.entries] == [("café", 2)]
