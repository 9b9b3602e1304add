"""An image's merged filesystem written out: as one tar (like `crane export`) or as a tree
in a directory (like the rootfs `umoci unpack` makes).

Both walk the view in sorted, depth-first order, so a directory comes before what is in
it and a hardlink's first path before its other names. The tree is written below its
directory only: every path is made component by component relative to an open descriptor
of its parent, never following a link (O_NOFOLLOW, dir_fd), so a symlink the image puts
in the tree is a name in it, never a way out of it.
"""

from __future__ import annotations

import os
import shutil
import stat
import tarfile
from collections.abc import Callable, Iterable
from contextlib import suppress
from typing import TYPE_CHECKING, BinaryIO

from pipeline.errors import PermanentError, UsageError

if TYPE_CHECKING:
    from pipeline.imageview import Node

COPY_CHUNK = 1 << 20


Opener = Callable[[str], BinaryIO]  # a file's content by path


def export_tar(nodes: Iterable[tuple[str, Node]], open_file: Opener, out: BinaryIO) -> int:
    """Write the tree as a PAX tar to `out`; the number of members."""
    first: dict[int, str] = {}  # inode -> the first path written with its data
    count = 0
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for path, node in nodes:
            if path == "":
                continue  # the root itself is no member
            info = tarfile.TarInfo(path)
            info.mode, info.uid, info.gid = node.mode & 0o7777, node.uid, node.gid
            info.uname, info.gname, info.mtime = node.uname, node.gname, int(node.mtime)
            if node.xattrs:
                info.pax_headers = {f"SCHILY.xattr.{k}": v.decode("utf-8", "surrogateescape")
                                    for k, v in node.xattrs.items()}
            data: BinaryIO | None = None
            if node.kind == "file" and node.ino in first:
                info.type, info.linkname = tarfile.LNKTYPE, first[node.ino]
            elif node.kind == "file":
                first[node.ino] = path
                info.type, info.size = tarfile.REGTYPE, node.size
                data = open_file(path)
            elif node.kind == "dir":
                info.type = tarfile.DIRTYPE
            elif node.kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, node.link
            elif node.kind in ("char", "block"):
                info.type = tarfile.CHRTYPE if node.kind == "char" else tarfile.BLKTYPE
                info.devmajor, info.devminor = node.devmajor, node.devminor
            elif node.kind == "fifo":
                info.type = tarfile.FIFOTYPE
            else:
                continue
            try:
                tar.addfile(info, data)
            finally:
                if data is not None:
                    data.close()
            count += 1
    return count


def export_dir(nodes: Iterable[tuple[str, Node]], open_file: Opener, root: str) -> int:
    """Write the tree below `root` (made if absent; it must be empty); the paths written.

    Owners, device nodes and every xattr namespace need root; without it files are the
    caller's and devices are skipped, as `tar x` does for an unprivileged user.
    """
    with suppress(FileExistsError):
        os.mkdir(root, 0o755)
    try:
        root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as e:
        raise UsageError(f"export --dir {root}: {e.strerror}") from None
    try:
        if os.listdir(root_fd):
            raise UsageError(f"export --dir {root}: not empty (export writes a new tree)")
        return _write_tree(nodes, open_file, root_fd, root)
    finally:
        os.close(root_fd)


def _write_tree(nodes: Iterable[tuple[str, Node]], open_file: Opener, root_fd: int,
                root: str) -> int:
    privileged = os.geteuid() == 0
    first: dict[int, str] = {}
    dirs: list[tuple[str, Node]] = []  # their modes and times are set last (after children)
    count = 0
    for path, node in nodes:
        if path == "":
            dirs.append((path, node))
            continue
        parent, name = _parent(root_fd, path, root)
        try:
            if node.kind == "dir":
                os.mkdir(name, 0o700, dir_fd=parent)
                dirs.append((path, node))
                count += 1
                continue
            if node.kind == "file" and node.ino in first:
                link_parent, link_name = _parent(root_fd, first[node.ino], root)
                try:
                    os.link(link_name, name, src_dir_fd=link_parent, dst_dir_fd=parent,
                            follow_symlinks=False)
                finally:
                    os.close(link_parent)
                count += 1
                continue
            if node.kind == "file":
                first[node.ino] = path
                _write_file(parent, name, open_file(path))
            elif node.kind == "symlink":
                os.symlink(node.link, name, dir_fd=parent)
            elif node.kind == "fifo":
                os.mkfifo(name, 0o600, dir_fd=parent)
            elif node.kind in ("char", "block"):
                if not privileged:
                    continue
                kind = stat.S_IFCHR if node.kind == "char" else stat.S_IFBLK
                os.mknod(name, kind | 0o600, os.makedev(node.devmajor, node.devminor),
                         dir_fd=parent)
            else:
                continue
            _set_meta(parent, name, node, privileged)
            count += 1
        except OSError as e:
            raise PermanentError(f"export --dir {root}: {path}: {e.strerror}") from None
        finally:
            os.close(parent)
    for path, node in reversed(dirs):  # deepest first: a read-only dir is set after its children
        if path == "":
            _set_meta(root_fd, ".", node, privileged)
            continue
        parent, name = _parent(root_fd, path, root)
        try:
            _set_meta(parent, name, node, privileged)
        finally:
            os.close(parent)
    return count


def _parent(root_fd: int, path: str, root: str) -> tuple[int, str]:
    """An open descriptor of `path`'s parent below the root, and its last name; each
    component is opened without following a link, so nothing leads out of the tree."""
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise PermanentError(f"export --dir {root}: refusing the path {path!r}")
    fd = os.dup(root_fd)
    try:
        for part in parts[:-1]:
            nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = nxt
    except OSError as e:
        os.close(fd)
        raise PermanentError(f"export --dir {root}: {path}: its parent is not a directory "
                             f"in the tree ({e.strerror})") from None
    return fd, parts[-1]


def _write_file(parent: int, name: str, src: BinaryIO) -> None:
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600,
                 dir_fd=parent)
    with src, os.fdopen(fd, "wb") as out:
        shutil.copyfileobj(src, out, COPY_CHUNK)


def _set_meta(parent: int, name: str, node: Node, privileged: bool) -> None:
    """Owner (as root), xattrs, mode and times, never through a link."""
    if privileged:
        os.chown(name, node.uid, node.gid, dir_fd=parent, follow_symlinks=False)
    target = f"/proc/self/fd/{parent}/{name}"
    for key, value in node.xattrs.items():
        if node.kind != "symlink":
            with suppress(OSError):  # a namespace this filesystem or user cannot hold
                os.setxattr(target, key, value, follow_symlinks=False)
    if node.kind != "symlink":  # (Linux has no lchmod; `name` is what we just made here)
        os.chmod(name, node.mode & 0o7777, dir_fd=parent)
    with suppress(NotImplementedError, OSError):
        os.utime(name, (node.mtime, node.mtime), dir_fd=parent, follow_symlinks=False)
