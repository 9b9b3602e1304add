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
  aufs metadata (a component `.wh..wh.` + anything but a final `.opq`, e.g. the
  `.wh..wh.plnk` link store and what it holds), and a whiteout that hides nothing (`.wh.`
  alone). Each is recorded in `indexer.refused` (member name and why, the first 100) and
  counted in `indexer.refused_count`, so a caller logs one line ("12 entries left out of
  the index: ...") instead of failing the layer. Also recorded there, with the entry kept:
  a `LIBARCHIVE.xattr` whose value is not base64 (that xattr is left out). A hardlink to
  a file of aufs's link store becomes that file under the link's name (its data is in
  the tar), as docker's unpacker makes it.

Entry types: regular (`0`, NUL, `7` contiguous), hardlink `1`, symlink `2`, char `3`, block
`4`, dir `5`, fifo `6`. As in tarfile and archive/tar, only regular files have data in the
tar: the size field of the other types is ignored, and their Entry has size 0. A regular
file's `offset` is its first data byte in the tar; a file of at most one chunk has
`digest`, the sha256 of its content, and a larger one `chunks`, the sha256 of each
`chunk_size` piece, instead (its `digest` is empty). Symlink
targets are kept as written (the view never follows them outside the image); hardlink
targets are normalised like paths (a hostile one leaves the entry out).

Speed: file data is hashed with hashlib on memoryview slices of the caller's chunks (no
copies), a whole run of a file's bytes at a time, never block by block; the per-chunk
Python work is a few comparisons. Each byte of file content is hashed once (the
stage that feeds the indexer already hashes the whole tar for its diff_id). No
reference to a fed buffer is kept once feed() returns, so the caller may reuse it. An
entry costs about 10 µs of Python besides its hashing (a header in one struct unpack,
the common case of each field first), so millions of entries take seconds, in linear
time, and memory grows by one Entry each. `python -m bench.tarindex_speed` measures it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import struct
from dataclasses import replace
from urllib.parse import unquote_to_bytes
from zlib import adler32 as _adler32

from pipeline.digest import Digest
from pipeline.errors import PermanentError
from pipeline.fileindex import CHUNK_SIZE, Entry, LayerIndex

BLOCK = 512
MAX_EXTENSION = 1 << 20  # bytes of PAX/GNU long-name data one entry may carry
MAX_PATH = 4096  # bytes; a longer name or link is left out (Linux's PATH_MAX)
MAX_REFUSED_SHOWN = 100  # hostile names kept for the log line; all are counted

_ZERO_BLOCK = bytes(BLOCK)
# name mode uid gid size mtime chksum type linkname magic+version uname gname devmajor
# devminor prefix (ustar; other formats keep other things in the last 167 bytes)
_HEADER_FIELDS = struct.Struct("100s8s8s8s12s12s8sc100s8s32s32s8s8s155s12x")
_NS = b"\0 "  # what pads an octal field
_AUFS = "aufs metadata (.wh..wh.*), not part of the image"
_POSIX_MAGIC = b"ustar\x0000"  # ustar/POSIX: the only format whose prefix field is a prefix
_KINDS = {ord("0"): "file", 0: "file", ord("7"): "file", ord("1"): "hardlink",
          ord("2"): "symlink", ord("3"): "char", ord("4"): "block", ord("5"): "dir",
          ord("6"): "fifo"}

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

    def __init__(self, diff_id: Digest, *, chunk_size: int = CHUNK_SIZE,
                 digests: bool = True) -> None:
        """`digests=False`: headers only, no file content hashed (entries get no digest
        or chunks; pipeline/indexing.py adds them when the index is published)."""
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive, not {chunk_size}")
        self.diff_id = diff_id
        self.chunk_size = chunk_size
        self.digests = digests
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
        self._file: tuple | None = None  # the fields of its Entry, while its data streams
        self._hash = None
        self._chunker: _Chunker | None = None
        # Regular files under aufs metadata directories, by path: left out of the index,
        # but hardlinks to them are resolved (see _entry).
        self._aufs: dict[str, Entry] = {}
        self._owners: dict[bytes, str] = {}  # uname/gname header fields, decoded

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
            if state == _DATA:  # the hot path: one hash update per chunk
                take = min(self._left, n - i)
                piece = mv[i:i + take]
                if self._chunker is None:
                    self._hash.update(piece)
                else:
                    self._chunker.feed(piece)
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
                i += self._header(block, self._pos + i - BLOCK, mv, i)
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
        return LayerIndex(self.diff_id, self._pos, tuple(self._entries), self.chunk_size,
                          self.digests)

    def _unfinished(self) -> str:
        """Where the stream stopped, if that is not a place a tar may end; else ""."""
        if self._state == _END:
            return ""
        if self._state == _DATA:
            return f"inside the data of {_shown(self._file[0].encode())}"
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

    def _header(self, block: bytes, offset: int, mv: memoryview, at: int) -> int:
        """Act on the header `block`; how many bytes of `mv` from `at` it took with it (the
        data of a small file, when all of it is there)."""
        if block == _ZERO_BLOCK:
            self._state = _END
            return 0
        f = _HEADER_FIELDS.unpack(block)
        try:  # the usual octal fields; anything else is read again, slowly, by _number
            stored, size = int(f[6].rstrip(_NS) or b"0", 8), int(f[4].rstrip(_NS) or b"0", 8)
        except ValueError:
            stored = self._number(block, 148, 156, "checksum", offset)
            size = self._number(block, 124, 136, "size", offset)
        # The checksum field counts as eight spaces. Adler-32's low half is 1 + the sum of
        # its bytes while that stays under 65521, as it does for 256 bytes: the byte sum at
        # C speed (a Python sum over the block cost more than the rest of the header).
        unsigned = ((_adler32(block[:256]) & 0xFFFF) + (_adler32(block[256:]) & 0xFFFF) - 2
                    - sum(f[6]) + 8 * 32)
        if stored != unsigned:
            self._check_signed_sum(block, stored, unsigned, offset)
        if size < 0:
            raise self._bad(f"negative size {size}", offset)
        kind = block[156]
        if kind in b"xgLK":
            self._start_extension(kind, size, offset)
            return 0
        return self._entry(block, f, kind, size, offset, mv, at)

    def _check_signed_sum(self, block: bytes, stored: int, unsigned: int, offset: int) -> None:
        # Some old tars summed the bytes as signed chars.
        signed = unsigned - 256 * sum(1 for b in block if b >= 128)
        signed += 256 * sum(1 for b in block[148:156] if b >= 128)
        if stored != signed:
            raise self._bad(f"header checksum mismatch (stored {stored}, computed "
                            f"{unsigned}); not a tar, or corrupt", offset)

    def _number(self, block: bytes, start: int, end: int, what: str, offset: int) -> int:
        """A numeric field as tarfile reads it: octal up to a NUL, or GNU base-256."""
        field = block[start:end]
        if field[0] in (0o200, 0o377):  # GNU base-256: big-endian, 0o377 means negative
            n = int.from_bytes(field[1:], "big")
            return n - (1 << (8 * (end - start - 1))) if field[0] == 0o377 else n
        try:
            return int(_nts(field).strip() or b"0", 8)
        except ValueError:
            raise self._bad(f"malformed {what} field {bytes(field)!r}", offset) from None

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

    def _take_extensions(self) -> tuple[dict[str, bytes], bytes | None, bytes | None]:
        """The extension headers waiting for this entry (PAX, global PAX under it, GNU long
        name and link), taken: the next entry starts with none."""
        pax = self._pax
        if self._global:
            pax = {**self._global, **pax}
        if pax:
            self._pax = {}
            if not all(pax.values()):
                pax = {k: v for k, v in pax.items() if v}
        gnu_name, gnu_link = self._gnu_name, self._gnu_link
        if gnu_name is not None or gnu_link is not None:
            self._gnu_name = self._gnu_link = None
        self._ext_bytes = 0
        return pax, gnu_name, gnu_link

    def _name_and_kind(self, f: tuple[bytes, ...], kind: int, size: int, offset: int,
                       pax: dict[str, bytes], gnu_name: bytes | None,
                       ) -> tuple[bytes, int, int, str]:
        """The entry's name as the tar gives it (PAX path, GNU long name, ustar prefix +
        name), its type flag and size after PAX, and its kind; BadTar for a kind the
        index cannot describe."""
        raw_name = pax.get("path") if pax else None
        if raw_name is None:
            raw_name = gnu_name
        if raw_name is None:
            raw_name = f[0].partition(b"\0")[0]
            if f[9] == _POSIX_MAGIC and f[14][0]:
                raw_name = f[14].partition(b"\0")[0] + b"/" + raw_name
        if pax:
            size = self._pax_int(pax, "size", size, offset)
            if kind == 83 or any(k.startswith("GNU.sparse.") for k in pax):  # 83: "S"
                kind = 83
        if kind == 0 and raw_name.endswith(b"/"):
            kind = 53  # "5": old tars mark a directory by the slash alone
        kind_name = _KINDS.get(kind)
        if kind_name is None:  # PAX sparse files: the real name, not GNUSparseFile.<pid>/
            raise self._unsupported(pax.get("GNU.sparse.name", raw_name), kind, offset)
        return raw_name, kind, size, kind_name

    def _paths(self, f: tuple[bytes, ...], raw_name: bytes, kind_name: str,
               pax: dict[str, bytes], gnu_link: bytes | None,
               ) -> tuple[str, str, str, str | None]:
        """(path, kind as indexed, link target, why it is refused or None). Every path of
        the entry is checked before anything else is decoded: a hostile entry is left out
        whole, its data skipped."""
        path, why = _normalise(raw_name, kind_name == "dir")
        kind_out = kind_name
        if why is None and ".wh." in path:
            kind_out, path, why = _whiteout(kind_name, path)
        link = ""
        if kind_name == "hardlink" or kind_name == "symlink":
            raw_link = pax.get("linkpath") if pax else None
            if raw_link is None:
                raw_link = gnu_link if gnu_link is not None else f[8].partition(b"\0")[0]
            if why is None and kind_name == "hardlink":
                link, why = _normalise(raw_link, False)
                if why is not None:
                    why = f"hardlink target {raw_link.decode('utf-8', 'replace')!r}: {why}"
            elif why is None:
                link, why = _symlink(raw_link)
        return path, kind_out, link, why

    def _fields(self, block: bytes, f: tuple[bytes, ...], offset: int,
                pax: dict[str, bytes], raw_name: bytes,
                ) -> tuple[int, int, int, float, str, str, dict[str, bytes]]:
        """(mode, uid, gid, mtime, uname, gname, xattrs): the header's fields, with PAX's
        values over them."""
        try:  # the usual octal fields; anything else is read again, slowly, by _number
            mode, uid = int(f[1].rstrip(_NS) or b"0", 8), int(f[2].rstrip(_NS) or b"0", 8)
            gid, mtime = int(f[3].rstrip(_NS) or b"0", 8), int(f[5].rstrip(_NS) or b"0", 8)
        except ValueError:
            mode = self._number(block, 100, 108, "mode", offset)
            uid = self._number(block, 108, 116, "uid", offset)
            gid = self._number(block, 116, 124, "gid", offset)
            mtime = self._number(block, 136, 148, "mtime", offset)
        mode &= 0o7777
        mtime = float(mtime)
        # A layer has few owner names: one str each for all its entries (saves memory
        # and time with millions of entries).
        owners = self._owners
        uname = owners.get(f[10]) or self._owner(f[10])
        gname = owners.get(f[11]) or self._owner(f[11])
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
            xattrs = self._xattrs(pax, raw_name, offset)
        return mode, uid, gid, mtime, uname, gname, xattrs

    def _entry(self, block: bytes, f: tuple[bytes, ...], kind: int, size: int,
               offset: int, mv: memoryview, at: int) -> int:
        # Called once per entry: kept lean (a layer of small files spends most of its
        # indexing time here, not hashing): a few steps, each a method, none per byte.
        pax, gnu_name, gnu_link = self._take_extensions()
        raw_name, kind, size, kind_name = self._name_and_kind(f, kind, size, offset, pax,
                                                              gnu_name)
        has_data = kind_name == "file"
        path, kind_out, link, why = self._paths(f, raw_name, kind_name, pax, gnu_link)
        aufs = why is _AUFS and kind_out == "file"
        if why is not None:
            self._refuse(raw_name, offset, why)
            if not aufs:
                self._skip(size if has_data else 0, -size % BLOCK if has_data else 0)
                return 0
        if link and link in self._aufs:
            # A hardlink into aufs's link store (.wh..wh.plnk) is the file kept there,
            # under this name: as docker's unpacker makes it, since the store is left out.
            self._entries.append(replace(self._aufs[link], path=path))
            return 0

        mode, uid, gid, mtime, uname, gname, xattrs = self._fields(block, f, offset, pax,
                                                                   raw_name)
        if kind_out != "file":
            devmajor = devminor = 0
            if kind_name == "char" or kind_name == "block":
                devmajor = self._number(block, 329, 337, "devmajor", offset)
                devminor = self._number(block, 337, 345, "devminor", offset)
            # Only regular files have data in a tar; a whiteout's (usually none) is skipped.
            self._entries.append(Entry(path, kind_out, mode, uid, gid, mtime, 0, 0, link,
                                       devmajor, devminor, uname, gname, xattrs))
            self._skip(size if has_data else 0, -size % BLOCK if has_data else 0)
            return 0
        pad = -size % BLOCK
        if not self.digests:  # headers only: the data is passed over, not hashed
            self._file = (path, mode, uid, gid, mtime, size, offset + BLOCK, uname, gname,
                          xattrs, aufs)
            self._hash = self._chunker = None
            self._pad = 0
            self._end_file()
            if size + pad <= len(mv) - at:
                return size + pad
            self._skip(size, pad)
            return 0
        if size <= self.chunk_size and size + pad <= len(mv) - at and not aufs:
            # The whole of a small file is in this chunk (the usual case): its Entry now,
            # without going through the states, which cost more than hashing 4 KiB.
            self._entries.append(Entry(
                path, "file", mode, uid, gid, mtime, size, offset + BLOCK, "", 0, 0, uname,
                gname, xattrs, hashlib.sha256(mv[at:at + size]).hexdigest()))
            return size + pad
        self._file = (path, mode, uid, gid, mtime, size, offset + BLOCK, uname, gname,
                      xattrs, aufs)
        # A large file is hashed per chunk only: a whole-file digest too would hash each
        # of its bytes twice, and reads verify chunk by chunk anyway.
        large = size > self.chunk_size
        self._chunker = _Chunker(self.chunk_size) if large else None
        self._hash = None if large else hashlib.sha256()
        self._pad = pad
        if size:
            self._state, self._left = _DATA, size
        else:
            self._end_file()
        return 0

    def _end_file(self) -> None:
        path, mode, uid, gid, mtime, size, offset, uname, gname, xattrs, aufs = self._file
        chunks = self._chunker.digests() if self._chunker is not None else ()
        entry = Entry(path, "file", mode, uid, gid, mtime, size, offset, "", 0, 0, uname,
                      gname, xattrs, self._hash.hexdigest() if self._hash else "", chunks)
        self._file = self._hash = self._chunker = None
        if aufs:  # not in the index, but a later hardlink may name it
            self._aufs[path] = entry
        else:
            self._entries.append(entry)
        if self._pad:
            self._state, self._left = _SKIP, self._pad
        else:
            self._state = _HEADER

    def _owner(self, field: bytes) -> str:
        # Owner names only label an entry: an undecodable byte is shown, not refused.
        name = field.partition(b"\0")[0].decode("utf-8", "replace")
        if len(self._owners) < 1000:  # a hostile tar's million names are not all kept
            self._owners[field] = name
        return name

    def _unsupported(self, raw_name: bytes, kind: int, offset: int) -> UnsupportedEntry:
        shown = _shown(raw_name)
        if kind == 83:
            what = "is a GNU sparse file, which cannot be indexed (its data is not the " \
                   "file's bytes)"
        else:
            what = (f"has tar type {chr(kind)!r}, which is not a file, link, device, fifo "
                    f"or directory")
        return UnsupportedEntry(f"layer {self.diff_id.short}: member {shown} at offset "
                                f"{offset} {what}")

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
        n = int(value)
        if n >= 1 << 63:  # as Go's archive/tar (containerd's) reads it: an int64
            raise self._bad(f"PAX {key}={value[:40]!r} is out of range", offset)
        return n

    def _pax_float(self, value: bytes, offset: int) -> float:
        try:
            if b"_" in value or not value.strip():
                raise ValueError
            return float(value)
        except ValueError:
            raise self._bad(f"PAX mtime={value[:40]!r} is not a number", offset) from None

    def _xattrs(self, pax: dict[str, bytes], raw_name: bytes,
                offset: int) -> dict[str, bytes]:
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
                    self._refuse(raw_name, offset, f"xattr {key!r} is not valid base64 or "
                                                f"UTF-8 (left out, the entry kept)")
        return xattrs

    # -- reporting ---------------------------------------------------------------------

    def _refuse(self, raw_name: bytes, offset: int, why: str) -> None:
        self.refused_count += 1
        if len(self.refused) < MAX_REFUSED_SHOWN:
            self.refused.append(f"{_shown(raw_name)} at offset {offset}: {why}")

    def _bad(self, what: str, offset: int) -> BadTar:
        return BadTar(f"layer {self.diff_id.short}: tar header at offset {offset}: {what}")


class _Chunker:
    """The sha256 of each chunk_size piece of one large file, as its data streams by."""

    __slots__ = ("size", "left", "hash", "done")

    def __init__(self, size: int) -> None:
        self.size = self.left = size
        self.hash = hashlib.sha256()
        self.done: list[str] = []

    def feed(self, piece: memoryview) -> None:
        while len(piece) >= self.left:
            take = self.left
            self.hash.update(piece[:take])
            self.done.append(self.hash.hexdigest())
            self.hash = hashlib.sha256()
            self.left = self.size
            piece = piece[take:]
        if piece:
            self.hash.update(piece)
            self.left -= len(piece)

    def digests(self) -> tuple[str, ...]:
        if self.left < self.size:  # the last, partial chunk
            self.done.append(self.hash.hexdigest())
        return tuple(self.done)


# -- names -------------------------------------------------------------------------------

def _nts(field: bytes) -> bytes:
    """A NUL-terminated field's bytes (a name fills its field with no NUL at 100 bytes)."""
    nul = field.find(0)
    return field if nul < 0 else field[:nul]


def _shown(raw_name: bytes) -> str:
    """A member name for a message: quoted, undecodable bytes replaced, at most 200 chars."""
    shown = raw_name.decode("utf-8", "replace")
    return repr(shown if len(shown) <= 200 else shown[:197] + "...")


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
    # Most names are already normal: nothing to strip, no "." or ".." (nor ".wh."
    # names, which stay as they are here) can hide where no component starts with ".".
    if ("/." not in name and "//" not in name and name[0] not in "./" and name[-1] != "/"
            and len(raw) <= MAX_PATH):
        return name, None
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
