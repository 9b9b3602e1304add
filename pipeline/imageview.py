"""An image's merged file tree, built from its layers' file indexes (pipeline/fileindex.py).

`ImageView.from_layers(indexes)` applies the layers bottom first with the OCI image-spec
changeset rules ("Applying Changesets", "Whiteouts"), so `files`, `cat`, `export` and a
read-only mount can list and read the image without unpacking it. Each node says which
layer's tar holds its data and at what offset; `open()` reads it through a caller-given
`reader(layer_position, offset, length)`, which is where the tier logic lives.

Merging one layer, in two steps:
1. Its whiteouts and opaque markers, wherever they stand in its tar, act on the LOWER
   layers only: `.wh.<name>` removes the lower entry and its subtree; an opaque marker in
   `d` removes every lower entry below `d` (`d` stays). Markers never show.
2. Its other entries, in tar order: a directory over a directory keeps the children and
   takes the new metadata; anything else replaces the old entry and its whole subtree. A
   later duplicate in one layer replaces the earlier one by the same rule. A hardlink shares
   the data (and inode) of its target as the tree stands when the hardlink is applied; a
   missing target (or a directory) drops it, noted in `problems`. Missing parents are
   implied (0o755, root-owned), as tar extractors do. Symlinks are never followed while
   merging: an entry below a path that is a symlink (or any non-directory) is dropped
   and noted in `problems`, and a whiteout through a symlink hides nothing.

Indexes are untrusted: an entry whose path (or hardlink target) is not normalised as
fileindex documents (absolute, `.`/`..`, empty components) is dropped and noted. Merging is
linear in the number of entries; every removal visits each entry at most once.
"""

from __future__ import annotations

import io
import stat
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field

from pipeline.digest import Digest
from pipeline.errors import (
    NotADirectoryInImage,
    NotAFileInImage,
    NotASymlinkInImage,
    NotInImage,
    SizeMismatch,
    SymlinkLoopInImage,
)
from pipeline.fileindex import Entry, LayerIndex, without_cyclic_gc

MAX_SYMLINKS = 40  # as Linux's path walk: more than this many links is ELOOP
ROOT_INO = 1

_TYPE_BITS = {"file": stat.S_IFREG, "dir": stat.S_IFDIR, "symlink": stat.S_IFLNK,
              "char": stat.S_IFCHR, "block": stat.S_IFBLK, "fifo": stat.S_IFIFO}

Reader = Callable[[int, int, int], bytes]  # (layer position, offset in its tar, length)


@dataclass(slots=True)
class Node:
    """One path of the merged image, as `stat` would describe it.

    `kind` is never `hardlink`, `whiteout` or `opaque`: a hardlinked path shows its target's
    inode (kind, metadata and data), with `nlink` paths sharing the same `ino`. `layer` and
    `diff_id` name the layer whose tar holds the data (for an implied directory, the layer
    that implied it); `offset` is where a regular file's data starts in that tar.
    """

    path: str
    kind: str
    mode: int
    uid: int
    gid: int
    mtime: float
    size: int
    link: str
    devmajor: int
    devminor: int
    uname: str
    gname: str
    xattrs: dict[str, bytes] = field(hash=False)
    digest: str
    chunks: tuple[str, ...]
    layer: int
    diff_id: Digest | None
    offset: int
    nlink: int
    ino: int

    @property
    def st_mode(self) -> int:
        """Type and permission bits, as stat(2) gives them."""
        return st_mode(self.kind, self.mode)


def st_mode(kind: str, mode: int) -> int:
    """Type and permission bits, as stat(2) gives them, of a path of this kind and mode."""
    return _TYPE_BITS.get(kind, 0) | (mode & 0o7777)


class _Rec:
    """An inode while merging: the entry giving its metadata and data, its layer, its ino.

    Hardlinked paths share one _Rec, so they share one inode as on a real filesystem.
    """

    __slots__ = ("entry", "layer", "ino")

    def __init__(self, entry: Entry, layer: int, ino: int) -> None:
        self.entry = entry
        self.layer = layer
        self.ino = ino


def _valid(path: str) -> bool:
    """True when `path` is normalised as fileindex documents ("" is the root)."""
    if path == "":
        return True
    wrapped = f"/{path}/"
    return ("//" not in wrapped and "/./" not in wrapped and "/../" not in wrapped
            and "\0" not in path)


def normalise(path: str) -> str:
    """A caller's path as a view path: relative, no `.`/`..`, `..` never above the root."""
    parts: list[str] = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if parts:
                parts.pop()
            continue
        parts.append(part)
    return "/".join(parts)


def _parent(path: str) -> tuple[str, str]:
    head, _, name = path.rpartition("/")
    return head, name


def _join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


class ImageView:
    """The merged, immutable file tree of an image. Build with `from_layers`."""

    def __init__(self, recs: dict[str, _Rec], kids: dict[str, tuple[str, ...]],
                 diff_ids: tuple[Digest, ...], problems: list[str],
                 linked: AbstractSet[int] = frozenset()) -> None:
        self._recs = recs
        self._kids = kids
        self._diff_ids = diff_ids
        # Link counts of the inodes a hardlink was made to (every other one has 1 path).
        self._nlink = Counter(rec.ino for rec in recs.values() if rec.ino in linked) \
            if linked else Counter()
        self.problems: tuple[str, ...] = tuple(problems)

    # ------------------------------------------------------------------ building

    @classmethod
    def from_layers(cls, indexes: Sequence[LayerIndex]) -> ImageView:
        """Merge `indexes` (bottom layer first) with the OCI layer rules."""
        with without_cyclic_gc():
            merge = _Merge(tuple(ix.diff_id for ix in indexes))
            for position, index in enumerate(indexes):
                merge.apply(position, index)
            kids = {path: tuple(sorted(names)) for path, names in merge.kids.items()}
            return cls(merge.recs, kids, merge.diff_ids, merge.problems, merge.linked)

    # ------------------------------------------------------------------ queries

    def __len__(self) -> int:
        """How many paths the image holds, the root included."""
        return len(self._recs)

    def __contains__(self, path: str) -> bool:
        return normalise(path) in self._recs

    def _node(self, path: str, rec: _Rec) -> Node:
        e = rec.entry
        layer = rec.layer
        diff_id = self._diff_ids[layer] if 0 <= layer < len(self._diff_ids) else None
        return Node(path, e.kind, e.mode, e.uid, e.gid, e.mtime, e.size, e.link, e.devmajor,
                    e.devminor, e.uname, e.gname, dict(e.xattrs), e.digest, e.chunks, layer,
                    diff_id, e.offset, self._nlink.get(rec.ino, 1), rec.ino)

    def stat(self, path: str) -> Node:
        """The node at `path` itself (a symlink is not followed); NotInImage if none."""
        p = normalise(path)
        rec = self._recs.get(p)
        if rec is None:
            raise NotInImage(f"/{p}: no such file or directory in the image")
        return self._node(p, rec)

    def listdir(self, path: str) -> list[str]:
        """The sorted names in the directory `path` (a symlink is not followed)."""
        p = normalise(path)
        names = self._kids.get(p)
        if names is None:
            if p in self._recs:
                raise NotADirectoryInImage(f"/{p}: not a directory in the image")
            raise NotInImage(f"/{p}: no such file or directory in the image")
        return list(names)

    def readlink(self, path: str) -> str:
        """A symlink's target, as written in its layer."""
        node = self.stat(path)
        if node.kind != "symlink":
            raise NotASymlinkInImage(f"/{node.path}: not a symbolic link in the image")
        return node.link

    def resolve(self, path: str, follow_last: bool = True) -> Node:
        """The node `path` names once symlinks INSIDE the image are followed.

        An absolute link target starts again at the image root, `..` never climbs above
        it; more than 40 links in one resolution is SymlinkLoopInImage. With
        `follow_last=False` a final symlink is returned itself (as lstat).
        """
        pending = [part for part in reversed(path.split("/")) if part not in ("", ".")]
        done: list[str] = []
        links = 0
        while pending:
            part = pending.pop()
            if part == "..":
                if done:
                    done.pop()
                continue
            candidate = "/".join((*done, part))
            rec = self._recs.get(candidate)
            if rec is None:
                raise NotInImage(f"/{candidate}: no such file or directory in the image"
                                 f" (resolving {path!r})")
            kind = rec.entry.kind
            if kind == "symlink" and (pending or follow_last):
                links += 1
                if links > MAX_SYMLINKS:
                    raise SymlinkLoopInImage(f"{path!r}: more than {MAX_SYMLINKS} symbolic "
                                             f"links (a loop) in the image")
                target = rec.entry.link
                if not target:
                    raise NotInImage(f"/{candidate}: a symbolic link to nothing in the image"
                                     f" (resolving {path!r})")
                if target.startswith("/"):
                    done = []
                pending.extend(t for t in reversed(target.split("/")) if t not in ("", "."))
                continue
            if pending and kind != "dir":
                raise NotADirectoryInImage(f"/{candidate}: not a directory in the image"
                                           f" (resolving {path!r})")
            done.append(part)
        p = "/".join(done)
        return self._node(p, self._recs[p])

    def walk(self, top: str = "") -> Iterator[tuple[str, Node]]:
        """Every (path, node) from `top` (the root "" by default) down, `top` first,
        depth-first, siblings in sorted order."""
        for path, rec in self._walk(top):
            yield path, self._node(path, rec)

    def listing(self, top: str = "") -> Iterator[tuple[str, Entry, int]]:
        """As `walk`, but (path, the entry giving its metadata, its link count): what a
        listing prints, without making a Node for every path (a fifth of `files -R`)."""
        nlink = self._nlink
        for path, rec in self._walk(top):
            yield path, rec.entry, nlink.get(rec.ino, 1)

    def _walk(self, top: str) -> Iterator[tuple[str, _Rec]]:
        p = normalise(top)
        if p not in self._recs:
            raise NotInImage(f"/{p}: no such file or directory in the image")
        recs, kids = self._recs, self._kids
        stack = [p]  # paths still to visit, the next one last
        while stack:
            path = stack.pop()
            yield path, recs[path]
            names = kids.get(path)
            if names:
                prefix = f"{path}/" if path else ""
                stack.extend([prefix + name for name in reversed(names)])

    def open(self, path: str, reader: Reader) -> io.BufferedReader:
        """A seekable, read-only binary file over the regular file `path` (links followed).

        Its bytes come from `reader(layer_position, offset, length)`, offsets being in that
        layer's tar; the tier logic (disk pread, ranged GET, fetch) is the caller's.
        """
        node = self.resolve(path)
        if node.kind != "file":
            raise NotAFileInImage(f"/{node.path}: not a regular file in the image "
                                  f"(a {node.kind})")
        return io.BufferedReader(_DataFile(node, reader))


class _DataFile(io.RawIOBase):
    """A file's data, read on demand at its offset in its layer's tar."""

    def __init__(self, node: Node, reader: Reader) -> None:
        super().__init__()
        self._node = node
        self._reader = reader
        self._pos = 0
        self.name = "/" + node.path

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        self._checkClosed()
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._checkClosed()
        if whence == io.SEEK_SET:
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self._pos + offset
        elif whence == io.SEEK_END:
            pos = self._node.size + offset
        else:
            raise ValueError(f"invalid whence {whence!r}")
        if pos < 0:
            raise ValueError(f"negative seek position {pos}")
        self._pos = pos
        return pos

    def readinto(self, buffer) -> int:  # noqa: ANN001 - any writable buffer
        self._checkClosed()
        want = min(len(buffer), self._node.size - self._pos)
        if want <= 0:
            return 0
        data = self._reader(self._node.layer, self._node.offset + self._pos, want)
        if not data:
            raise SizeMismatch(f"/{self._node.path}: layer {self._node.diff_id} gave no bytes "
                               f"at offset {self._node.offset + self._pos} of the file's "
                               f"{self._node.size}")
        n = min(len(data), want)
        buffer[:n] = data[:n]
        self._pos += n
        return n


class _Merge:
    """The mutable state while layers are applied; an ImageView keeps only the result."""

    def __init__(self, diff_ids: tuple[Digest, ...]) -> None:
        self.diff_ids = diff_ids
        self.problems: list[str] = []
        self._next_ino = ROOT_INO + 1
        self.recs: dict[str, _Rec] = {"": _Rec(Entry("", "dir", 0o755), 0 if diff_ids else -1,
                                                 ROOT_INO)}
        self.kids: dict[str, set[str]] = {"": set()}
        self.linked: set[int] = set()  # inodes a hardlink was made to

    def _ino(self) -> int:
        ino = self._next_ino
        self._next_ino += 1
        return ino

    def _problem(self, position: int, text: str) -> None:
        self.problems.append(f"layer {position} ({self.diff_ids[position]}): {text}")

    def _remove(self, path: str) -> None:
        """Remove `path` and everything below it (never the root itself)."""
        parent, name = _parent(path)
        siblings = self.kids.get(parent)
        if siblings is not None:
            siblings.discard(name)
        stack = [path]
        while stack:
            p = stack.pop()
            self.recs.pop(p, None)
            names = self.kids.pop(p, None)
            if names:
                stack.extend(_join(p, n) for n in names)

    def _clear(self, path: str) -> None:
        """Remove everything below the directory `path`; it stays."""
        for name in list(self.kids.get(path, ())):
            self._remove(_join(path, name))

    def _ensure_parents(self, path: str, position: int) -> bool:
        """Imply `path`'s missing parent directories; False (noted) if one is not a dir.

        An existing non-directory parent is left alone and the entry dropped: a symlink
        is never followed while merging (real unpackers follow it within the rootfs), and
        a file cannot hold children (tar extractors fail there).
        """
        missing: list[str] = []
        p = _parent(path)[0]
        while True:
            rec = self.recs.get(p)
            if rec is not None:
                break
            missing.append(p)
            p = _parent(p)[0]
        kind = rec.entry.kind
        if kind != "dir":
            how = "not followed" if kind == "symlink" else "it cannot hold entries"
            self._problem(position, f"/{path}: /{p} is a {kind}, {how}; entry dropped")
            return False
        for p in reversed(missing):
            self._insert(p, _Rec(Entry(p, "dir", 0o755), position, self._ino()))
        return True

    def _insert(self, path: str, rec: _Rec) -> None:
        parent, name = _parent(path)
        self.recs[path] = rec
        self.kids[parent].add(name)
        if rec.entry.kind == "dir":
            self.kids[path] = set()

    def apply(self, position: int, index: LayerIndex) -> None:
        """Apply one layer: its markers against the lower layers, then its entries."""
        entries = [e for e in index.entries if self._sane(position, e)]
        for e in entries:  # step 1: whiteouts and opaque markers act on lower layers only
            if e.kind == "whiteout":
                if e.path in self.recs:
                    self._remove(e.path)
            elif e.kind == "opaque":
                rec = self.recs.get(e.path)
                if rec is not None and rec.entry.kind == "dir":
                    self._clear(e.path)
        for e in entries:  # step 2: everything else, in tar order
            if e.kind not in ("whiteout", "opaque"):
                self._add(position, e)

    def _sane(self, position: int, e: Entry) -> bool:
        bad = ""
        if not _valid(e.path):
            bad = f"path {e.path!r} is not normalised"
        elif e.kind == "hardlink" and (not _valid(e.link) or e.link == ""):
            bad = f"/{e.path}: hardlink target {e.link!r} is not normalised"
        elif e.path == "" and e.kind not in ("dir", "opaque"):
            bad = f"a {e.kind} entry for the root directory"
        if bad:
            self._problem(position, f"{bad}; entry ignored")
            return False
        return True

    def _add(self, position: int, e: Entry) -> None:
        path = e.path
        if path == "":  # the root's own entry: new metadata, same children
            self.recs[""] = _Rec(e, position, ROOT_INO)
            return
        if e.kind == "hardlink":
            target = self.recs.get(e.link)
            if target is None or target.entry.kind == "dir":
                what = "missing" if target is None else "a directory"
                self._problem(position, f"/{path}: hardlink to /{e.link}, which is {what}; "
                                        f"dropped")
                return
            rec = target
            self.linked.add(target.ino)
        else:
            rec = None
        parent, _, name = path.rpartition("/")
        siblings = self.kids.get(parent)  # only directories have a set of names
        if siblings is None:
            if not self._ensure_parents(path, position):
                return
            siblings = self.kids[parent]
        recs = self.recs
        old = recs.get(path)
        if rec is None:
            if old is not None and e.kind == "dir" and old.entry.kind == "dir":
                recs[path] = _Rec(e, position, old.ino)  # keeps the lower children
                return
            rec = _Rec(e, position, self._next_ino)
            self._next_ino += 1
        if old is not None:
            self._remove(path)
        recs[path] = rec
        siblings.add(name)
        if e.kind == "dir":
            self.kids[path] = set()
