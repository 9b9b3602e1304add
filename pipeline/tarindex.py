"""Index a layer's tar as it streams by: one pass, no seeks, fed in chunks of any size.

    indexer = TarIndexer(diff_id)      # the Digest of the decompressed tar
    indexer.feed(chunk)                # bytes | memoryview, as the decompress stage makes them
    index = indexer.finish()           # LayerIndex; tar_size = every byte fed

The headers are parsed here, not by `tarfile`: tarfile wants a file it can read again,
and the decompress stage has only the stream. Formats read: ustar/POSIX (the `prefix`
field), GNU (`L` long names, `K` long link names, base-256 numbers), PAX extended (`x`:
path, linkpath, size, uid, gid, uname, gname, mtime, and xattrs from `SCHILY.xattr.<name>`
and `LIBARCHIVE.xattr.<name>`, whose value is base64 and name %-encoded) and global (`g`,
applied to every later entry, under that entry's own `x`) headers, old v7 headers. Every
header's checksum is checked. The archive ends at its first zero block (a missing second
one is fine, and so is a tar that stops at a header boundary with no zero block at all, as
tarfile and Go's archive/tar accept); whatever follows the end is counted in `tar_size`
and otherwise ignored.

What is refused, and how:

- A tar that cannot be read (a bad header checksum, a malformed number or PAX record, a
  stream that ends inside a header or a file's data) raises `BadTar` naming the layer and
  the offset. After an error the indexer stays failed: every later call raises it again.
- An entry whose content cannot be served from its offset in the tar raises
  `UnsupportedEntry` (a `BadTar`): GNU sparse files (type `S`, or PAX `GNU.sparse.*`
  keys), whose data is not the file's bytes, and any type other than the ones listed
  below (GNU dumpdir `D`, volume labels `V`, multi-volume `M`, Solaris `X`, vendor
  letters). Skipping them instead would make the image view silently wrong (a file
  missing, or the wrong bytes served); refusing leaves the caller to keep the layer
  without an index, which the view can then fall back from.
- A header extension (one PAX or GNU long-name header, or all of one entry's extension
  headers together, or the accumulated PAX global headers) over 1 MiB raises `BadTar`
  before its data is buffered: a hostile tar cannot make us hold more.
- A *hostile name* does not raise: the tar is what the image is, so the layer is still
  cached and indexed, only that entry is left out. Hostile: a member name (or hardlink
  target) with a `..` component or a NUL, one that is empty after normalising (except a
  directory naming the root, `./`, which is the entry of path "" and kind dir), one
  longer than 4096 bytes, one that is not UTF-8 (the stored index holds UTF-8 text),
  aufs metadata (`.wh..wh.` + anything but `.opq`, e.g. `.wh..wh.plnk`), and a whiteout
  that hides nothing (`.wh.` alone). Each is recorded in `indexer.refused` (member name
  and why, the first 100) and counted in `indexer.refused_count`, so a caller logs one
  line ("12 entries left out of the index: ...") instead of failing the layer.

Entry types: regular (`0`, NUL, `7` contiguous), hardlink `1`, symlink `2`, char `3`, block
`4`, dir `5`, fifo `6`. As in tarfile and archive/tar, only regular files have data in the
tar: the size field of the other types is ignored, and their Entry has size 0. A regular
file's `offset` is its first data byte in the tar, `digest` the sha256 of its content,
`chunks` the sha256 of each `chunk_size` piece when it is larger than one chunk. Symlink
targets are kept as written (the view never follows them outside the image); hardlink
targets are normalised like paths (a hostile one leaves the entry out).

Speed: file data is hashed with hashlib on memoryview slices of the caller's chunks (no
copies), a whole run of a file's bytes at a time, never block by block; the per-chunk
Python work is a few comparisons. Headers cost a few microseconds each, so millions of
entries take seconds and memory grows by one Entry each.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import replace
from urllib.parse import unquote_to_bytes

from pipeline.digest import Digest
from pipeline.errors import PermanentError
from pipeline.fileindex import CHUNK_SIZE, Entry, LayerIndex

BLOCK = 512
MAX_EXTENSION = 1 << 20  # bytes of PAX/GNU long-name data one entry may carry
MAX_PATH = 4096  # bytes; a longer name or link is left out (Linux's PATH_MAX)
MAX_REFUSED_SHOWN = 100  # hostile names kept for the log line; all are counted

_ZERO_BLOCK = bytes(BLOCK)
_AUFS = "aufs metadata (.wh..wh.*), not part of the image"
_POSIX_MAGIC = b"ustar\x0000"  # ustar/POSIX: the only format whose prefix field is a prefix
_REGULAR = frozenset(b"0\x007")
_KINDS = {ord("1"): "hardlink", ord("2"): "symlink", ord("3"): "char", ord("4"): "block",
          ord("5"): "dir", ord("6"): "fifo"}

# Parser states: what the next bytes of the stream are.
_HEADER, _DATA, _SKIP, _EXT, _END = range(5)


class BadTar(PermanentError):
    """A layer's tar that cannot be indexed: corrupt, truncated, or beyond our limits.

    The tar's digest may well be right (the image is what it is); it is its index that
    cannot be made, so a caller may still keep the layer, without an index."""


class UnsupportedEntry(BadTar):
    """A tar entry of a type whose content cannot be served from the tar (sparse, unknown)."""


class TarIndexer:
    """Streaming tar parser building a LayerIndex; see the module docstring."""

    def __init__(self, diff_id: Digest, *, chunk_size: int = CHUNK_SIZE) -> None:
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive, not {chunk_size}")
        self.diff_id = diff_id
        self.chunk_size = chunk_size
        self.refused: list[str] = []
        self.refused_count = 0
        self._entries: list[Entry] = []
        self._pos = 0  # bytes fed so far: the tar offset of the next chunk's first byte
        self._state = _HEADER
        self._left = 0  # bytes still to take in _DATA, _SKIP or _EXT
        self._pad = 0  # zero padding after the current data, to skip once it is taken
        self._hbuf = bytearray()  # a header split across chunks; an extension's data
        self._error: BadTar | None = None
        self._finished = False
        # Extension headers waiting for the entry they describe.
        self._ext_type = 0
        self._ext_offset = 0
        self._ext_bytes = 0  # this entry's extension data so far, against MAX_EXTENSION
        self._pax: dict[str, bytes] = {}
        self._gnu_name: bytes | None = None
        self._gnu_link: bytes | None = None
        self._global: dict[str, bytes] = {}
        self._global_bytes = 0
        # The regular file whose data is streaming by.
        self._file: _FileState | None = None
        # Regular files under aufs metadata directories, by path: left out of the index,
        # but hardlinks to them are resolved (see _entry).
        self._aufs: dict[str, Entry] = {}

    # -- the stream --------------------------------------------------------------------

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Take the next bytes of the tar; raise BadTar if they cannot be a tar."""
        if self._error is not None:
            raise self._error
        if self._finished:
            raise ValueError("TarIndexer.feed after finish")
        mv = memoryview(data)
        if mv.ndim != 1 or mv.itemsize != 1:
            mv = mv.cast("B")
        try:
            self._feed(mv)
        except BadTar as e:
            self._error = e
            raise
        finally:
            self._pos += len(mv)

    def _feed(self, mv: memoryview) -> None:
        n = len(mv)
        i = 0
        while i < n:
            state = self._state
            if state == _DATA:  # the hot path: one or two hash updates per chunk
                take = min(self._left, n - i)
                f = self._file
                piece = mv[i:i + take]
                f.hash.update(piece)
                if f.chunks is not None:
                    f.feed_chunks(piece)
                i += take
                self._left -= take
                if not self._left:
                    self._end_file()
            elif state == _SKIP:
                take = min(self._left, n - i)
                i += take
                self._left -= take
                if not self._left:
                    self._state = _HEADER
            elif state == _HEADER:
                hbuf = self._hbuf
                if not hbuf and n - i >= BLOCK:
                    block = bytes(mv[i:i + BLOCK])
                    i += BLOCK
                else:
                    take = min(BLOCK - len(hbuf), n - i)
                    hbuf += mv[i:i + take]
                    i += take
                    if len(hbuf) < BLOCK:
                        continue
                    block = bytes(hbuf)
                    hbuf.clear()
                self._header(block, self._pos + i - BLOCK)
            elif state == _EXT:
                take = min(self._left, n - i)
                self._hbuf += mv[i:i + take]
                i += take
                self._left -= take
                if not self._left:
                    self._end_extension()
            else:  # _END: what follows the end of the archive is not read
                return

    def finish(self) -> LayerIndex:
        """The index of everything fed; BadTar if the tar stopped inside an entry."""
        if self._error is not None:
            raise self._error
        if not self._finished:
            where = self._unfinished()
            if where:
                self._error = BadTar(f"layer {self.diff_id.short}: tar is truncated: "
                                     f"it ends {where} (after {self._pos} bytes)")
                raise self._error
            self._finished = True
        return LayerIndex(self.diff_id, self._pos, tuple(self._entries), self.chunk_size)

    def _unfinished(self) -> str:
        """Where the stream stopped, if that is not a place a tar may end; else ""."""
        if self._state == _END:
            return ""
        if self._state == _DATA:
            return f"inside the data of {self._file.name!r}"
        if self._state == _EXT:
            return f"inside an extension header at offset {self._ext_offset}"
        if self._state == _HEADER and self._hbuf:
            return f"inside a header at offset {self._pos - len(self._hbuf)}"
        if self._pax or self._gnu_name is not None or self._gnu_link is not None:
            return "after an extension header with no entry for it"
        if self._state == _SKIP and self._left > self._pad:
            return "inside the data of an entry"
        return ""  # at a header boundary, or in the padding of the last data: as tar does

    # -- headers -----------------------------------------------------------------------

    def _header(self, block: bytes, offset: int) -> None:
        if block == _ZERO_BLOCK:
            self._state = _END
            return
        self._check_sum(block, offset)
        kind = block[156]
        size = self._number(block, 124, 136, "size", offset)
        if size < 0:
            raise self._bad(f"negative size {size}", offset)
        if kind in b"xgLK":
            self._start_extension(kind, size, offset)
            return
        self._entry(block, kind, size, offset)

    def _check_sum(self, block: bytes, offset: int) -> None:
        stored = self._number(block, 148, 156, "checksum", offset)
        # The checksum field counts as eight spaces; some old tars summed signed bytes.
        unsigned = sum(block) - sum(block[148:156]) + 8 * 32
        if stored == unsigned:
            return
        signed = unsigned - 256 * sum(1 for b in block if b >= 128)
        signed += 256 * sum(1 for b in block[148:156] if b >= 128)
        if stored != signed:
            raise self._bad(f"header checksum mismatch (stored {stored}, computed "
                            f"{unsigned}); not a tar, or corrupt", offset)

    def _number(self, block: bytes, start: int, end: int, what: str, offset: int) -> int:
        field = block[start:end]
        if field[0] in (0o200, 0o377):  # GNU base-256: big-endian, 0o377 means negative
            n = int.from_bytes(field[1:], "big")
            return n - (1 << (8 * (end - start - 1))) if field[0] == 0o377 else n
        nul = field.find(0)
        if nul >= 0:
            field = field[:nul]
        field = field.strip()
        if not field:
            return 0
        try:
            if not field.isdigit() or b"8" in field or b"9" in field:
                raise ValueError
            return int(field, 8)
        except ValueError:
            raise self._bad(f"malformed {what} field {bytes(block[start:end])!r}",
                            offset) from None

    def _start_extension(self, kind: int, size: int, offset: int) -> None:
        if kind in b"xLK":
            self._ext_bytes += size
            if size > MAX_EXTENSION or self._ext_bytes > MAX_EXTENSION:
                raise self._bad(f"extension header of {size} bytes: one entry may carry at "
                                f"most {MAX_EXTENSION >> 20} MiB of them", offset)
        elif size > MAX_EXTENSION:
            raise self._bad(f"PAX global header of {size} bytes: at most "
                            f"{MAX_EXTENSION >> 20} MiB", offset)
        self._ext_type = kind
        self._ext_offset = offset
        self._pad = -size % BLOCK
        self._hbuf.clear()
        if size:
            self._state, self._left = _EXT, size
        else:
            self._end_extension()

    def _end_extension(self) -> None:
        data = bytes(self._hbuf)
        self._hbuf.clear()
        kind = self._ext_type
        if kind == ord("L"):
            self._gnu_name = _nts(data)
        elif kind == ord("K"):
            self._gnu_link = _nts(data)
        else:
            records = self._pax_records(data, self._ext_offset)
            if kind == ord("x"):
                # An empty value is kept: it masks a global value too, so that the header
                # field applies again (POSIX); the merge in _entry drops it.
                self._pax.update(records)
            else:
                for key, value in records:
                    if value:
                        self._global[key] = value
                    else:
                        self._global.pop(key, None)
                # What the global keys hold now, not every g header ever seen: a tar may
                # repeat one before each entry.
                self._global_bytes = sum(len(k) + len(v) for k, v in self._global.items())
                if self._global_bytes > MAX_EXTENSION:
                    raise self._bad(f"PAX global headers hold more than "
                                    f"{MAX_EXTENSION >> 20} MiB", self._ext_offset)
        self._skip(0, self._pad)

    def _pax_records(self, data: bytes, offset: int) -> list[tuple[str, bytes]]:
        """`<length> <key>=<value>\\n` records; the value stays bytes (xattrs are binary)."""
        records, pos, n = [], 0, len(data)
        while pos < n:
            if data[pos] == 0:  # some writers pad the data with NULs: the end
                break
            space = data.find(b" ", pos, pos + 21)
            try:
                length = int(data[pos:space]) if space > pos else -1
            except ValueError:
                length = -1
            end = pos + length
            if length <= space - pos + 1 or end > n or data[end - 1] != 0x0A:
                raise self._bad(f"malformed PAX record at byte {pos} of the PAX header",
                                offset)
            key, eq, value = data[space + 1:end - 1].partition(b"=")
            if not eq:
                raise self._bad(f"PAX record without '=' at byte {pos}", offset)
            try:
                records.append((key.decode(), value))
            except UnicodeDecodeError:
                raise self._bad(f"PAX key {key[:60]!r} is not UTF-8", offset) from None
            pos = end
        return records

    def _entry(self, block: bytes, kind: int, size: int, offset: int) -> None:
        pax = {**self._global, **self._pax} if self._global else self._pax
        if pax and not all(pax.values()):
            pax = {k: v for k, v in pax.items() if v}
        gnu_name, gnu_link = self._gnu_name, self._gnu_link
        self._pax, self._gnu_name, self._gnu_link, self._ext_bytes = {}, None, None, 0

        raw_name = pax.get("path")
        if raw_name is None:
            raw_name = gnu_name
        if raw_name is None:
            raw_name = _nts(block[0:100])
            if block[257:265] == _POSIX_MAGIC:
                prefix = _nts(block[345:500])
                if prefix:
                    raw_name = prefix + b"/" + raw_name
        raw_link = pax.get("linkpath")
        if raw_link is None:
            raw_link = gnu_link if gnu_link is not None else _nts(block[157:257])
        if pax:
            size = self._pax_int(pax, "size", size, offset)
        data_offset = offset + BLOCK
        shown = raw_name.decode("utf-8", "replace")

        if kind == 0 and raw_name.endswith(b"/"):
            kind = ord("5")  # old tars mark a directory by the slash alone
        if kind in _REGULAR:
            kind_name = "file"
        else:
            kind_name = _KINDS.get(kind)
        if kind == ord("S") or any(k.startswith("GNU.sparse.") for k in pax):
            raise UnsupportedEntry(
                f"layer {self.diff_id.short}: member {shown!r} at offset {offset} is a GNU "
                f"sparse file, which cannot be indexed (its data is not the file's bytes)")
        if kind_name is None:
            raise UnsupportedEntry(
                f"layer {self.diff_id.short}: member {shown!r} at offset {offset} has tar "
                f"type {chr(kind)!r}, which is not a file, link, device, fifo or directory")
        has_data = kind_name == "file"
        # Every path of the entry is checked before anything else is decoded: a hostile
        # entry is left out whole, its data skipped.
        path, why = _normalise(raw_name, kind_name == "dir")
        kind_out: str = kind_name
        if why is None:
            kind_out, path, why = _whiteout(kind_name, path)
        link = ""
        if why is None and kind_name == "hardlink":
            link, why = _normalise(raw_link, False)
            if why is not None:
                why = f"hardlink target {raw_link.decode('utf-8', 'replace')!r}: {why}"
        elif why is None and kind_name == "symlink":
            link, why = _symlink(raw_link)
        aufs = why is _AUFS and kind_out == "file"
        if why is not None:
            self._refuse(shown, offset, why)
            if not aufs:
                self._skip(size if has_data else 0, -size % BLOCK if has_data else 0)
                return
        if link in self._aufs:
            # A hardlink into aufs's link store (.wh..wh.plnk) is the file kept there,
            # under this name: as docker's unpacker makes it, since the store is left out.
            self._entries.append(replace(self._aufs[link], path=path))
            return

        mode = self._number(block, 100, 108, "mode", offset) & 0o7777
        uid = self._number(block, 108, 116, "uid", offset)
        gid = self._number(block, 116, 124, "gid", offset)
        mtime = float(self._number(block, 136, 148, "mtime", offset))
        uname = _text(block[265:297])
        gname = _text(block[297:329])
        xattrs: dict[str, bytes] = {}
        if pax:
            uid = self._pax_int(pax, "uid", uid, offset)
            gid = self._pax_int(pax, "gid", gid, offset)
            if "mtime" in pax:
                mtime = self._pax_float(pax["mtime"], offset)
            if "uname" in pax:
                uname = pax["uname"].decode("utf-8", "replace")
            if "gname" in pax:
                gname = pax["gname"].decode("utf-8", "replace")
            xattrs = self._xattrs(pax, shown, offset)
        devmajor = devminor = 0
        if kind_name in ("char", "block"):
            devmajor = self._number(block, 329, 337, "devmajor", offset)
            devminor = self._number(block, 337, 345, "devminor", offset)

        if kind_out != "file":
            # Only regular files have data in a tar; a whiteout's (usually none) is skipped.
            self._entries.append(Entry(path, kind_out, mode, uid, gid, mtime, 0, 0, link,
                                       devmajor, devminor, uname, gname, xattrs))
            self._skip(size if has_data else 0, -size % BLOCK if has_data else 0)
            return
        self._file = _FileState(path, mode, uid, gid, mtime, size, data_offset, uname,
                                gname, xattrs, self.chunk_size)
        self._file.aufs = aufs
        self._pad = -size % BLOCK
        if size:
            self._state, self._left = _DATA, size
        else:
            self._end_file()

    def _end_file(self) -> None:
        f = self._file
        self._file = None
        if f.aufs:  # not in the index, but a later hardlink may name it
            self._aufs[f.name] = f.entry()
        else:
            self._entries.append(f.entry())
        self._skip(0, self._pad)

    def _skip(self, size: int, pad: int) -> None:
        self._pad = pad
        if size + pad:
            self._state, self._left = _SKIP, size + pad
        else:
            self._state = _HEADER

    # -- PAX values --------------------------------------------------------------------

    def _pax_int(self, pax: dict[str, bytes], key: str, default: int, offset: int) -> int:
        value = pax.get(key)
        if value is None:
            return default
        if not value.isdigit():  # decimal, not negative: sizes and ids
            raise self._bad(f"PAX {key}={value[:40]!r} is not a number", offset)
        return int(value)

    def _pax_float(self, value: bytes, offset: int) -> float:
        try:
            if b"_" in value or not value.strip():
                raise ValueError
            return float(value)
        except ValueError:
            raise self._bad(f"PAX mtime={value[:40]!r} is not a number", offset) from None

    def _xattrs(self, pax: dict[str, bytes], shown: str, offset: int) -> dict[str, bytes]:
        xattrs: dict[str, bytes] = {}
        for key, value in pax.items():
            if key.startswith("SCHILY.xattr."):
                xattrs[key[13:]] = value
            elif key.startswith("LIBARCHIVE.xattr."):
                # libarchive %-encodes the name and base64-encodes the value (maybe unpadded).
                try:
                    name = unquote_to_bytes(key[17:]).decode()
                    xattrs[name] = base64.b64decode(value + b"=" * (-len(value) % 4),
                                                    validate=True)
                except (binascii.Error, UnicodeDecodeError, ValueError):
                    self._refuse(shown, offset, f"xattr {key!r} is not valid base64 or "
                                                f"UTF-8 (left out, the entry kept)")
        return xattrs

    # -- reporting ---------------------------------------------------------------------

    def _refuse(self, shown: str, offset: int, why: str) -> None:
        self.refused_count += 1
        if len(self.refused) < MAX_REFUSED_SHOWN:
            if len(shown) > 200:
                shown = shown[:197] + "..."
            self.refused.append(f"{shown!r} at offset {offset}: {why}")

    def _bad(self, what: str, offset: int) -> BadTar:
        return BadTar(f"layer {self.diff_id.short}: tar header at offset {offset}: {what}")


class _FileState:
    """The regular file whose data is being hashed, and what its Entry will hold."""

    __slots__ = ("name", "mode", "uid", "gid", "mtime", "size", "offset", "uname", "gname",
                 "xattrs", "hash", "chunks", "chunk_hash", "chunk_left", "chunk_size", "aufs")

    def __init__(self, name: str, mode: int, uid: int, gid: int, mtime: float, size: int,
                 offset: int, uname: str, gname: str, xattrs: dict[str, bytes],
                 chunk_size: int) -> None:
        self.name, self.mode, self.uid, self.gid, self.mtime = name, mode, uid, gid, mtime
        self.size, self.offset, self.uname, self.gname = size, offset, uname, gname
        self.xattrs = xattrs
        self.hash = hashlib.sha256()
        self.chunk_size = chunk_size
        # Per-chunk digests only for a file larger than one chunk (as fileindex says).
        self.chunks: list[str] | None = [] if size > chunk_size else None
        self.chunk_hash = hashlib.sha256() if self.chunks is not None else None
        self.chunk_left = chunk_size
        self.aufs = False

    def feed_chunks(self, piece: memoryview) -> None:
        while len(piece) >= self.chunk_left:
            take = self.chunk_left
            self.chunk_hash.update(piece[:take])
            self.chunks.append(self.chunk_hash.hexdigest())
            self.chunk_hash = hashlib.sha256()
            self.chunk_left = self.chunk_size
            piece = piece[take:]
        if piece:
            self.chunk_hash.update(piece)
            self.chunk_left -= len(piece)

    def entry(self) -> Entry:
        chunks: tuple[str, ...] = ()
        if self.chunks is not None:
            if self.chunk_left < self.chunk_size:  # the last, partial chunk
                self.chunks.append(self.chunk_hash.hexdigest())
            chunks = tuple(self.chunks)
        return Entry(self.name, "file", self.mode, self.uid, self.gid, self.mtime, self.size,
                     self.offset, "", 0, 0, self.uname, self.gname, self.xattrs,
                     self.hash.hexdigest(), chunks)


# -- names -------------------------------------------------------------------------------

def _nts(field: bytes) -> bytes:
    """A NUL-terminated field's bytes (a name fills its field with no NUL at 100 bytes)."""
    nul = field.find(0)
    return field if nul < 0 else field[:nul]


def _text(field: bytes) -> str:
    # Owner names only label an entry: an undecodable byte is shown, not refused.
    return _nts(field).decode("utf-8", "replace")


def _normalise(raw: bytes, root_ok: bool) -> tuple[str, str | None]:
    """(path, None) normalised as fileindex says, or ("", why) for a hostile name."""
    if b"\0" in raw:
        return "", "name contains a NUL"
    if not raw:
        return "", "empty name"
    try:
        name = raw.decode()
    except UnicodeDecodeError:
        return "", "name is not UTF-8"
    parts = [p for p in name.split("/") if p and p != "."]
    if ".." in parts:
        return "", "name has a '..' component"
    path = "/".join(parts)
    if not path and not root_ok:
        return "", "name is empty once normalised (only a directory may name the root)"
    if len(path.encode()) > MAX_PATH:
        return "", f"name longer than {MAX_PATH} bytes"
    return path, None


def _whiteout(kind: str, path: str) -> tuple[str, str, str | None]:
    """(kind, path, None) of an entry, whiteouts and opaque markers made so; or a refusal."""
    head, _, base = path.rpartition("/")
    if ".wh..wh." in path:
        parts = path.split("/")
        if base == ".wh..wh..opq":
            parts.pop()
        if any(p.startswith(".wh..wh.") for p in parts):
            return kind, path, _AUFS
    if not base.startswith(".wh."):
        return kind, path, None
    if base == ".wh..wh..opq":
        return "opaque", head, None
    hidden = base[4:]
    if not hidden or hidden in (".", ".."):
        return kind, path, f"whiteout {base!r} hides no name"
    return "whiteout", f"{head}/{hidden}" if head else hidden, None


def _symlink(raw: bytes) -> tuple[str, str | None]:
    if b"\0" in raw:
        return "", "symlink target contains a NUL"
    if len(raw) > MAX_PATH:
        return "", f"symlink target longer than {MAX_PATH} bytes"
    try:
        return raw.decode(), None
    except UnicodeDecodeError:
        return "", "symlink target is not UTF-8"
