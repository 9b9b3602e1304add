"""`layerwarm mount`: an image's merged view as a read-only FUSE filesystem.

Every operation is answered from the view (pipeline/imageview.py): lookups, attributes
with stable inode numbers and hardlink counts, directory listings, link targets and
xattrs come from the layers' indexes; a read is a range of one layer's tar, read through
the tiers (pipeline/layerread.py). So a program, or `chroot`, runs from the mount while
only the files it touches are read, and a layer only in the remote tier is never fetched
whole. Writes are refused (EROFS). The binding is mfusepy (ctypes over Debian's libfuse3).
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Iterable
from typing import Any

from pipeline.errors import ImagePathError, LayerwarmError, PermanentError, UsageError
from pipeline.imageopen import OpenedImage

log = logging.getLogger("layerwarm")


class FuseUnavailable(PermanentError):
    """No FUSE on this machine (no /dev/fuse, no libfuse)."""


def check_fuse() -> None:
    """FuseUnavailable, in one line, on a machine that cannot mount."""
    _binding()


def _binding() -> Any:
    if not os.path.exists("/dev/fuse"):
        raise FuseUnavailable("mount: this machine has no /dev/fuse (load the fuse module, or "
                              "give the container --device /dev/fuse)")
    try:
        import mfusepy
    except (ImportError, OSError) as e:  # mfusepy raises OSError when libfuse is missing
        raise FuseUnavailable(f"mount: libfuse cannot be loaded ({e}); install fuse3") from None
    return mfusepy


CACHE_SECONDS = 24 * 3600.0  # how long the kernel may trust a lookup or an attribute


def _dirent(n: Any) -> dict[str, int]:
    return {"st_mode": n.st_mode, "st_ino": n.ino}


def mount(image: OpenedImage, mountpoint: str, *, foreground: bool) -> None:
    """Serve the image at `mountpoint` until unmounted (`fusermount3 -u`) or signalled."""
    fuse = _binding()
    if not os.path.isdir(mountpoint):
        raise UsageError(f"mount: {mountpoint} is not a directory")
    ops = _operations(fuse, image)
    try:
        fuse.FUSE(ops, mountpoint, foreground=foreground, ro=True, use_ino=True,
                  default_permissions=True, allow_other=os.geteuid() == 0, max_threads=16,
                  fsname=f"layerwarm:{image.image.ref}", subtype="layerwarm")
    except RuntimeError as e:  # fuse_main's exit code
        # 8: its loop ended with an error, which libfuse 3 also reports when a signal
        # (SIGTERM, SIGINT) ended it. That is how a mount is stopped; 1-7 are failures.
        if str(e) != "8" or os.path.ismount(mountpoint):
            raise PermanentError(f"mount: libfuse could not serve {mountpoint} "
                                 f"(fuse_main exit code {e})") from None


def _operations(fuse: Any, image: OpenedImage) -> Any:
    view, reader = image.view, image.reader

    def node(path: str) -> Any:
        try:
            return view.stat(path)
        except ImagePathError as e:
            raise fuse.FuseOSError(e.errno) from None

    class ViewOperations(fuse.Operations):
        use_ns = True

        def init_with_config(self, conn: Any, config: Any) -> None:
            # An image never changes under its mount: the kernel may keep file pages
            # between opens (a second read of a file is the page cache's, not Python's)
            # and keep names and attributes for as long as the mount lives.
            if config is not None:
                config.kernel_cache = 1
                config.entry_timeout = config.attr_timeout = CACHE_SECONDS
                config.negative_timeout = CACHE_SECONDS

        def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
            n = node(path)
            ns = int(n.mtime * 1e9)
            return {"st_mode": n.st_mode,
                    "st_ino": n.ino, "st_nlink": n.nlink, "st_uid": n.uid, "st_gid": n.gid,
                    "st_size": n.size if n.kind in ("file", "symlink") else 0,
                    "st_rdev": os.makedev(n.devmajor, n.devminor),
                    "st_blocks": (n.size + 511) // 512,
                    "st_mtime": ns, "st_atime": ns, "st_ctime": ns}

        def readdir(self, path: str, fh: int) -> Iterable[tuple[str, dict[str, int], int]]:
            # With use_ino each name carries its inode: a name with inode 0 is taken for a
            # deleted entry by the C library, and `ls` would show an empty directory.
            try:
                names = view.listdir(path)
            except ImagePathError as e:
                raise fuse.FuseOSError(e.errno) from None
            here = node(path)
            parent = node(path.rsplit("/", 1)[0] or "/")
            out = [(".", _dirent(here), 0), ("..", _dirent(parent), 0)]
            base = path.rstrip("/")
            return out + [(name, _dirent(node(f"{base}/{name}")), 0) for name in names]

        def readlink(self, path: str) -> str:
            n = node(path)
            if n.kind != "symlink":
                raise fuse.FuseOSError(errno.EINVAL)
            return n.link

        def open(self, path: str, flags: int) -> int:
            if flags & (os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_TRUNC):
                raise fuse.FuseOSError(errno.EROFS)
            if node(path).kind != "file":
                raise fuse.FuseOSError(errno.EISDIR)
            return 0

        def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
            n = node(path)
            if offset >= n.size:
                return b""
            try:
                return reader.read(n.layer, n.offset + offset, min(size, n.size - offset))
            except (LayerwarmError, OSError) as e:  # never wrong bytes: an I/O error
                log.error("read %s at %d: %s", path, offset, e)
                raise fuse.FuseOSError(errno.EIO) from None

        def getxattr(self, path: str, name: str, position: int = 0) -> bytes:
            value = node(path).xattrs.get(name)
            if value is None:
                raise fuse.FuseOSError(fuse.ENOATTR)
            return value

        def listxattr(self, path: str) -> Iterable[str]:
            return list(node(path).xattrs)

        def statfs(self, path: str) -> dict[str, int]:
            total = sum(x.tar_size for x in reader.indexes)
            return {"f_bsize": 4096, "f_frsize": 4096, "f_blocks": (total + 4095) // 4096,
                    "f_bfree": 0, "f_bavail": 0, "f_files": sum(len(x.entries)
                                                                for x in reader.indexes),
                    "f_ffree": 0, "f_namemax": 255}

    return ViewOperations()
