"""Entries written past the page cache (pipeline/directio.py): the same bytes on disk as a
buffered write, whatever the sizes, and the same bytes where the file system refuses
O_DIRECT, at open or at the first write."""

from __future__ import annotations

import errno
import fcntl
import os
import subprocess
from pathlib import Path
from typing import Any, BinaryIO

import pytest

from pipeline import directio
from pipeline.directio import BLOCK, BUFFER, WRITE_AT, DirectWriter


def _data(size: int) -> bytes:
    return (os.urandom(4099) * (size // 4099 + 1))[:size]


def _open(path: Path) -> BinaryIO:
    # As the disk tier opens an entry's temp file (tiers/disk.py: Ingest).
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    return os.fdopen(fd, "wb")


def _write(path: Path, data: bytes, chunk: int) -> DirectWriter:
    with _open(path) as out:
        w = DirectWriter(out)
        for i in range(0, len(data), chunk):
            w.write(data[i:i + chunk])
        w.close()
        assert out.tell() == len(data)
    return w


def _direct_here(tmp_path: Path) -> bool:
    """Whether this file system takes O_DIRECT at all (ext4, xfs do; some do not)."""
    fd = os.open(tmp_path / "probe", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_DIRECT)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
        os.unlink(tmp_path / "probe")


@pytest.mark.parametrize("size", [0, 1, BLOCK - 1, BLOCK, BLOCK + 1, WRITE_AT - 1, WRITE_AT,
                                  WRITE_AT + 1, BUFFER + 1, 2 * BUFFER + 12345])
@pytest.mark.parametrize("chunk", [7919, 1 << 20, BUFFER + 5])  # the last: more than fits
def test_the_file_holds_exactly_the_bytes_written(tmp_path: Path, size: int, chunk: int) -> None:
    data = _data(size)
    w = _write(tmp_path / "entry", data, chunk)
    assert (tmp_path / "entry").read_bytes() == data
    # Every whole block of a file of a write or more went past the page cache; only the
    # tail was buffered. A smaller file is written buffered, all of it.
    expected = size - size % BLOCK if size >= WRITE_AT and _direct_here(tmp_path) else 0
    assert w.direct_bytes == expected


def test_a_direct_write_leaves_the_page_cache_empty(tmp_path: Path) -> None:
    if not _direct_here(tmp_path):
        pytest.fail(f"the tests' temp dir {tmp_path} has no O_DIRECT: nothing to check here")
    size = 3 * BUFFER + 100
    _write(tmp_path / "entry", _data(size), 1 << 20)
    resident = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--output", "RES", str(tmp_path / "entry")],
        capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    assert int(resident) <= BLOCK  # the buffered tail's page at most, not 12 MiB


def test_a_file_system_without_o_direct_gets_the_same_bytes_buffered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = fcntl.fcntl

    def refusing(fd: int, cmd: int, arg: int = 0) -> Any:
        if cmd == fcntl.F_SETFL and arg & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, cmd, arg)

    monkeypatch.setattr(directio.fcntl, "fcntl", refusing)
    data = _data(2 * BUFFER + 5)
    w = _write(tmp_path / "entry", data, 65536)
    assert w.direct_bytes == 0
    assert (tmp_path / "entry").read_bytes() == data


def test_a_first_direct_write_refused_goes_on_buffered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real, refused = os.pwrite, []

    def pwrite(fd: int, data: Any, offset: int) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT and not refused:
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, offset)

    monkeypatch.setattr(directio.os, "pwrite", pwrite)
    if not _direct_here(tmp_path):
        pytest.fail(f"the tests' temp dir {tmp_path} has no O_DIRECT: nothing to check here")
    data = _data(3 * BUFFER + 77)
    path = tmp_path / "entry"
    with _open(path) as out:
        w = DirectWriter(out)
        for i in range(0, len(data), 1 << 20):
            w.write(data[i:i + (1 << 20)])
        w.close()
        assert not fcntl.fcntl(out.fileno(), fcntl.F_GETFL) & os.O_DIRECT
    assert refused == [0] and w.direct_bytes == 0
    assert path.read_bytes() == data


def test_a_file_that_does_not_start_on_a_block_is_written_buffered(tmp_path: Path) -> None:
    path = tmp_path / "entry"
    data = _data(BUFFER + 3)
    with _open(path) as out:
        out.write(b"0123456789")
        w = DirectWriter(out)
        w.write(data)
        w.close()
    assert w.direct_bytes == 0
    assert path.read_bytes() == b"0123456789" + data
