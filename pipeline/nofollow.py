"""Files under the cache directory, opened and looked at without following symbolic links.

Anyone who can write the cache directory (another user of a shared cache, a script gone
wrong) can put a link, a FIFO or a device where layerwarm keeps its own files: an entry, a
staged blob, a download's `.partial`, a temp file, a lock. Followed, a link would make
layerwarm create, truncate, append to or hash a file elsewhere; opened, a FIFO would hang.
So every file the cache opens under its own directory is opened by `open_file`, and every
look at one is an lstat (`regular`). A name that is not a regular file is not the cache's:
`drop_stray` removes the name (never what a link points to) with one warning, and the
caller goes on as if nothing was there. The cache's own subdirectories are checked by
`real_dir`: a link in place of one is refused, never written through. The same helpers
guard `.meta.db` and its side files (SQLite would follow a link) and the `file://` remote
tier's objects and sidecars.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from pathlib import Path

from pipeline.errors import NotAFile, PermanentError

log = logging.getLogger("layerwarm")

_KINDS = ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a directory"),
          (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device"))


def file_kind(mode: int) -> str:
    """What a file that is not a regular file is, for a message."""
    return next((name for test, name in _KINDS if test(mode)), "not a file")


def _not_a_file(path: Path, what: str, mode: int) -> NotAFile:
    return NotAFile(f"{what} {path} is not a regular file but {file_kind(mode)}")


def open_file(path: Path, flags: int = os.O_RDONLY, mode: int = 0o600, *,
              what: str = "cache file") -> int:
    """`os.open` for a file under the cache: a descriptor of a regular file, or NotAFile.

    O_NOFOLLOW refuses a link at `path` (with O_CREAT too: a dangling link's target is never
    created); O_NONBLOCK lets a FIFO open without waiting for a writer, so it is refused
    rather than hung on. The descriptor is blocking again when returned.
    """
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    except OSError as e:
        if e.errno not in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
            raise
        raise _not_a_file(path, what, os.lstat(path).st_mode) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _not_a_file(path, what, st.st_mode)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def regular(path: Path, what: str = "cache file") -> os.stat_result | None:
    """The lstat of the regular file at `path`; None when nothing is there, else NotAFile."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(st.st_mode):
        raise _not_a_file(path, what, st.st_mode)
    return st


def drop_stray(path: Path, what: str) -> bool:
    """Remove whatever is at `path` if it is not a regular file (the name only); True if so.

    One warning names it. A directory is never removed (nothing here deletes a tree): it
    raises NotAFile, one line asking for it to be removed. The caller holds the name's lock.
    """
    try:
        regular(path, what)
    except NotAFile as e:
        mode = os.lstat(path).st_mode
        if stat.S_ISDIR(mode):
            raise NotAFile(f"{e}: remove it") from None
        os.unlink(path)
        log.warning("%s: removed it%s", e,
                    " (what it points to is left alone)" if stat.S_ISLNK(mode) else "")
        return True
    return False


def real_dir(path: Path) -> None:
    """Raise unless `path` is a directory itself, not a link to one.

    Refused rather than replaced: another layerwarm process may be using the directory
    the link names right now (its locks, its temp files), and a new directory beside it
    would let two processes hold "the same" lock. Removing the link is the owner's call.
    """
    mode = os.lstat(path).st_mode
    if not stat.S_ISDIR(mode):
        raise PermanentError(f"cache directory {path} is {file_kind(mode)}, not a directory: "
                             "remove it (layerwarm writes nothing through links)")
