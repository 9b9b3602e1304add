"""Entries written to disk as they grow and left out of the page cache
(pipeline/writebehind.py): the same bytes as a plain write whatever the sizes, the page
cache holding at most a few windows while the file grows and none of it after `close`,
errors of the writeback and of the background flush raised to the writer."""

from __future__ import annotations

import ctypes
import errno
import os
import threading
import time
from pathlib import Path
from typing import BinaryIO

import pytest

from pipeline import writebehind
from pipeline.writebehind import FLUSH_EVERY, WINDOW, WriteBehind
from tests.support.pagecache import resident


def _data(size: int) -> bytes:
    return (os.urandom(4099) * (size // 4099 + 1))[:size]


def _open(path: Path) -> BinaryIO:
    # As the disk tier opens an entry's temp file (tiers/disk.py: Ingest).
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    return os.fdopen(fd, "wb")


def _write(path: Path, data: bytes, chunk: int) -> None:
    with _open(path) as out:
        with WriteBehind(out) as w:
            for i in range(0, len(data), chunk):
                w.write(data[i:i + chunk])
        assert out.tell() == len(data)


@pytest.mark.parametrize("size", [0, 1, 4095, WINDOW - 1, WINDOW, WINDOW + 1,
                                  3 * WINDOW, 4 * WINDOW + 12345])
@pytest.mark.parametrize("chunk", [7919, 1 << 20, 2 * WINDOW + 5])  # the last: windows at once
def test_the_file_holds_exactly_the_bytes_written(tmp_path: Path, size: int, chunk: int) -> None:
    data = _data(size)
    _write(tmp_path / "entry", data, chunk)
    assert (tmp_path / "entry").read_bytes() == data


def test_a_file_that_does_not_start_at_zero_keeps_what_was_before(tmp_path: Path) -> None:
    path = tmp_path / "entry"
    data = _data(3 * WINDOW + 3)
    with _open(path) as out:
        out.write(b"0123456789")
        with WriteBehind(out) as w:
            w.write(data)
        out.write(b"!")  # close left the file positioned at its end
    assert path.read_bytes() == b"0123456789" + data + b"!"


def test_the_page_cache_holds_a_few_windows_while_writing_and_none_after_the_fsync(
    tmp_path: Path,
) -> None:
    """`close` leaves the last windows to the caller's fsync (as Ingest.commit does it);
    `drop_cached` after it gives their pages back."""
    path = tmp_path / "entry"
    with _open(path) as out:
        w = WriteBehind(out)
        for _ in range(10):
            w.write(_data(WINDOW))
            # Written and dropped up to two windows behind the last one sent.
            assert resident(path) <= 3 * WINDOW
        w.close()
        assert resident(path) <= 3 * WINDOW
        os.fsync(out.fileno())
        writebehind.drop_cached(out.fileno())
    assert resident(path) == 0
    assert path.stat().st_size == 10 * WINDOW


def test_kept_windows_stay_in_the_page_cache_after_the_fsync(tmp_path: Path) -> None:
    """`keep_cached` (a publish reads the file next): every window is still written back
    as the file grows, but none is dropped; `drop_cached` gives them back after."""
    path = tmp_path / "entry"
    with _open(path) as out:
        w = WriteBehind(out, keep_cached=True)
        for _ in range(10):
            w.write(_data(WINDOW))
        w.close()
        os.fsync(out.fileno())
        assert resident(path) == 10 * WINDOW
        writebehind.drop_cached(out.fileno())
    assert resident(path) == 0


def test_without_sync_file_range_the_writes_are_plain_buffered_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(writebehind, "_load_sync_file_range", lambda: None)
    path = tmp_path / "entry"
    data = _data(3 * WINDOW + 5)
    _write(path, data, 1 << 20)
    assert path.read_bytes() == data
    assert resident(path) > 2 * WINDOW  # nothing dropped: the fsync does all the work


def test_a_device_is_written_without_writeback_or_flushes(tmp_path: Path) -> None:
    # Scenario 3 of the bench decompresses into /dev/null.
    chunk = _data(WINDOW)
    with open("/dev/null", "wb") as out:
        with WriteBehind(out) as w:
            for _ in range(FLUSH_EVERY // WINDOW + 2):
                w.write(chunk)


def test_a_failed_writeback_is_an_error_naming_the_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing(fd: int, offset: int, nbytes: int, flags: int) -> int:
        ctypes.set_errno(errno.EIO)  # what ctypes.get_errno then reads, as after a C call
        return -1

    monkeypatch.setattr(writebehind, "_load_sync_file_range", lambda: failing)
    with _open(tmp_path / "entry") as out:
        w = WriteBehind(out)
        with pytest.raises(OSError, match="writing to disk: Input/output error") as e:
            w.write(_data(WINDOW))
    assert e.value.errno == errno.EIO


def test_a_failed_background_flush_is_raised_by_close(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The fsync that follows on the same open file would not report it again.
    calls: list[int] = []

    def fdatasync(fd: int) -> None:
        calls.append(fd)
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(writebehind.os, "fdatasync", fdatasync)
    with _open(tmp_path / "entry") as out:
        w = WriteBehind(out)
        w.write(_data(FLUSH_EVERY))
        with pytest.raises(OSError, match="writing to disk: Input/output error"):
            w.close()
    assert calls, "no background flush ran"


def test_a_failing_block_raises_its_own_error_once_the_flush_has_ended(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The caller closes (and drops) the file next: the flush must be done with its fd.
    release, ended = threading.Event(), []

    def fdatasync(fd: int) -> None:
        release.wait()
        time.sleep(0.05)  # still flushing when a writer that did not wait would go on
        ended.append(fd)
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(writebehind.os, "fdatasync", fdatasync)
    with _open(tmp_path / "entry") as out:
        with pytest.raises(ValueError, match="the decompressor's"):
            with WriteBehind(out) as w:
                w.write(_data(FLUSH_EVERY))
                release.set()
                raise ValueError("the decompressor's")
        assert ended == [out.fileno()]
