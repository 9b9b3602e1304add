"""A test-only file indexer over Python's tarfile, until pipeline/tarindex.py lands.

Path normalisation and whiteout mapping as pipeline/fileindex.py documents them; a file's
digest is the sha256 of its content; chunks are left empty. Entries with `..` are dropped,
as the real indexer does. Small and slow on purpose: tests only.
"""

from __future__ import annotations

import hashlib
import io
import tarfile

from pipeline.digest import Digest
from pipeline.fileindex import Entry, LayerIndex

_XATTR = "SCHILY.xattr."


def _norm(name: str) -> str | None:
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        return None
    return "/".join(parts)


def _kind(m: tarfile.TarInfo) -> str | None:
    if m.isreg():
        return "file"
    for test, kind in ((m.isdir, "dir"), (m.issym, "symlink"), (m.islnk, "hardlink"),
                       (m.ischr, "char"), (m.isblk, "block"), (m.isfifo, "fifo")):
        if test():
            return kind
    return None


def index_of_tar(tar_bytes: bytes, diff_id: Digest | str) -> LayerIndex:
    """The LayerIndex of an uncompressed tar held in memory."""
    if isinstance(diff_id, str):
        diff_id = Digest.parse(diff_id)
    entries: list[Entry] = []
    with tarfile.open(fileobj=io.BytesIO(tar_bytes), mode="r:") as tar:
        for m in tar:
            path = _norm(m.name)
            kind = _kind(m)
            if path is None or kind is None:
                continue
            head, _, name = path.rpartition("/")
            if name == ".wh..wh..opq":
                entries.append(Entry(head, "opaque"))
                continue
            if name.startswith(".wh..wh."):
                continue  # other AUFS metadata: not part of the image
            if name.startswith(".wh."):
                target = f"{head}/{name[4:]}" if head else name[4:]
                entries.append(Entry(target, "whiteout"))
                continue
            data = b""
            if kind == "file":
                fh = tar.extractfile(m)
                data = fh.read() if fh is not None else b""
            link = m.linkname
            if kind == "hardlink":
                link = _norm(link) or ""
            xattrs = {k[len(_XATTR):]: v.encode("utf-8", "surrogateescape")
                      for k, v in m.pax_headers.items() if k.startswith(_XATTR)}
            entries.append(Entry(
                path, kind, m.mode & 0o7777, m.uid, m.gid, float(m.mtime),
                m.size if kind == "file" else 0, m.offset_data if kind == "file" else 0, link,
                m.devmajor if kind in ("char", "block") else 0,
                m.devminor if kind in ("char", "block") else 0,
                m.uname, m.gname, xattrs,
                hashlib.sha256(data).hexdigest() if kind == "file" else ""))
    return LayerIndex(diff_id, len(tar_bytes), tuple(entries))


def assert_content(tar: bytes, index: LayerIndex) -> None:
    """Every file entry's offset holds its bytes, and its digests (if the index has them:
    `index.digests`) are theirs."""
    assert index.tar_size == len(tar)
    for e in index.entries:
        if e.kind != "file":
            continue
        data = tar[e.offset:e.offset + e.size]
        assert len(data) == e.size
        size = index.chunk_size
        if not index.digests:
            assert (e.digest, e.chunks) == ("", ()), e.path
        elif e.size > size:  # a large file: per-chunk digests instead of one of the whole
            assert e.digest == ""
            assert list(e.chunks) == [hashlib.sha256(data[i:i + size]).hexdigest()
                                      for i in range(0, len(data), size)]
        else:
            assert hashlib.sha256(data).hexdigest() == e.digest
            assert e.chunks == ()
