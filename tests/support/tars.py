"""Deterministic tar building: files, dirs, symlinks, hardlinks and whiteouts.

Fixed mtime, owner and format, so the same entries always give the same bytes (and
digests). Plain Python, no pytest: benchmarks reuse it through ``tests.support.images``.
"""

from __future__ import annotations

import io
import random
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass

MTIME = 1_700_000_000  # fixed so tars do not depend on the clock


def _info(path: str, type_: bytes, mode: int, size: int = 0, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(path)
    info.type, info.mode, info.size, info.linkname = type_, mode, size, link
    info.mtime = MTIME
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


@dataclass(frozen=True)
class File:
    """A regular file."""

    path: str
    data: bytes = b""
    mode: int = 0o644

    def tarinfo(self) -> tuple[tarfile.TarInfo, bytes | None]:
        return _info(self.path, tarfile.REGTYPE, self.mode, len(self.data)), self.data


@dataclass(frozen=True)
class Dir:
    """A directory."""

    path: str
    mode: int = 0o755

    def tarinfo(self) -> tuple[tarfile.TarInfo, bytes | None]:
        return _info(self.path, tarfile.DIRTYPE, self.mode), None


@dataclass(frozen=True)
class Symlink:
    """A symbolic link; ``target`` is stored verbatim (may be absolute or dangling)."""

    path: str
    target: str

    def tarinfo(self) -> tuple[tarfile.TarInfo, bytes | None]:
        return _info(self.path, tarfile.SYMTYPE, 0o777, link=self.target), None


@dataclass(frozen=True)
class Hardlink:
    """A hard link to an earlier entry ``target`` (a path inside the same tar)."""

    path: str
    target: str

    def tarinfo(self) -> tuple[tarfile.TarInfo, bytes | None]:
        return _info(self.path, tarfile.LNKTYPE, 0o644, link=self.target), None


@dataclass(frozen=True)
class Whiteout:
    """An OCI whiteout deleting ``path`` from lower layers (written as ``dir/.wh.name``).

    With ``opaque=True``, ``path`` is a directory and the entry is ``path/.wh..wh..opq``.
    """

    path: str
    opaque: bool = False

    def tarinfo(self) -> tuple[tarfile.TarInfo, bytes | None]:
        path = self.path.rstrip("/")
        if self.opaque:
            full = f"{path}/.wh..wh..opq"
        else:
            head, _, name = path.rpartition("/")
            full = f"{head}/.wh.{name}" if head else f".wh.{name}"
        return _info(full, tarfile.REGTYPE, 0o644), b""


Entry = File | Dir | Symlink | Hardlink | Whiteout


def make_tar(entries: Sequence[Entry]) -> bytes:
    """Build an uncompressed tar from ``entries``, in order, byte-for-byte reproducible."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for entry in entries:
            info, data = entry.tarinfo()
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


_WORDS = (
    "layer blob digest manifest index config registry cache warm tar gzip zstd "
    "verify stream fetch publish resolve platform rootfs whiteout symlink"
).split()


def _text(rng: random.Random, size: int) -> bytes:
    # One random block tiled to size: compressible like real text, cheap for big sizes.
    lines = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 12))) for _ in range(80)]
    block = ("\n".join(lines) + "\n").encode()
    return (block * (size // len(block) + 1))[:size]


def random_tar(seed: int, size: int) -> bytes:
    """A reproducible tar of roughly ``size`` bytes: a few random and text files, a symlink."""
    rng = random.Random(seed)
    count = 2 + rng.randrange(3)
    per_file = max(size - 2048 * count, count) // count
    entries: list[Entry] = [Dir(f"seed{seed}"), Dir(f"seed{seed}/etc")]
    for i in range(count):
        if i % 2:
            entries.append(File(f"seed{seed}/etc/text{i}.txt", _text(rng, per_file)))
        else:
            entries.append(File(f"seed{seed}/bin{i}.dat", rng.randbytes(per_file), 0o755))
    entries.append(Symlink(f"seed{seed}/latest", "bin0.dat"))
    return make_tar(entries)
