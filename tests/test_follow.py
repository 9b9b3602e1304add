"""Decompression that follows a download (pipeline/follow.py): in one process
(materialize.fetch_and_decompress) and across processes (stages.decompress_following).

The fast path must give the same bytes and digests as fetching then decompressing, and
must never name an entry from a blob that did not verify. The blob source here is a fake
registry client so each failure (a slow body, a cut connection, a server ignoring Range,
a corrupt byte) happens exactly where the test wants it; the real registry path is covered
by every warm test, which goes through the same function.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from pipeline.digest import Digest, Verifier
from pipeline.errors import TransientError, VerificationError
from pipeline.follow import GrowingFile, StreamAbandoned, partial_path
from pipeline.following import better_later, decompress_following, fetch_and_decompress
from pipeline.layer import LayerSpec
from pipeline.reference import Reference
from pipeline.retry import RetryPolicy
from pipeline.tiers.disk import DiskTier
from tests.support.images import Layer, random_tar
from tests.support.paused_fetch import BlobStream

TAR = random_tar(11, 5_000_000)
REF = Reference.parse("127.0.0.1:5000/app:1")


class FakeClient:
    """Serves one blob in small chunks, with faults on the first request if asked."""

    retry = RetryPolicy(base=0.01)  # what stages.fetch retries a cut blob by

    def __init__(self, blob: bytes, *, cut_at: int | None = None, ignore_range: bool = False,
                 delay: float = 0.0) -> None:
        self.blob, self.cut_at, self.ignore_range, self.delay = blob, cut_at, ignore_range, delay
        self.requests: list[int] = []

    def open_blob(self, ref: Reference, digest: Digest, *, offset: int = 0) -> BlobStream:
        self.requests.append(offset)
        first = len(self.requests) == 1
        start = 0 if self.ignore_range else offset
        return BlobStream(start, self._chunks(start, first))

    def _chunks(self, start: int, first: bool) -> Iterator[bytes]:
        step = 64 << 10
        for pos in range(start, len(self.blob), step):
            if first and self.cut_at is not None and pos >= self.cut_at:
                raise TransientError("connection lost mid-body (test)")
            time.sleep(self.delay)
            yield self.blob[pos:pos + step]


def spec(lay: Layer) -> LayerSpec:
    return LayerSpec(Digest.parse(lay.digest), Digest.parse(lay.diff_id), lay.media_type,
                     lay.size, (REF,))


def warm_one(client: FakeClient, layer: LayerSpec, disk: DiskTier, **kw: object) -> int:
    with disk.lock(layer.digest):  # as materialize calls it
        return fetch_and_decompress(client, layer, disk, **kw)  # type: ignore[arg-type]


def entries(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("sha256_"))


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for d in (".tmp", ".staging") if (root / d).is_dir()
                  for p in (root / d).iterdir())


@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
def test_followed_download_gives_the_entry_and_no_leftovers(
    tmp_path: Path, compression: str
) -> None:
    lay = Layer(TAR, compression)
    disk = DiskTier(tmp_path)
    with ThreadPoolExecutor(1) as cpu:
        size = warm_one(FakeClient(lay.blob, delay=0.001), spec(lay), disk, submit_cpu=cpu.submit)
    assert size == len(TAR)
    assert (tmp_path / ("sha256_" + lay.digest[7:])).read_bytes() == TAR
    assert leftovers(tmp_path) == []


def test_cut_connection_resumes_and_decompression_keeps_going(tmp_path: Path) -> None:
    lay = Layer(TAR, "gzip")
    client = FakeClient(lay.blob, cut_at=len(lay.blob) // 2)
    warm_one(client, spec(lay), DiskTier(tmp_path))
    assert client.requests[0] == 0 and client.requests[1] > 0, "second request was a Range"
    assert (tmp_path / ("sha256_" + lay.digest[7:])).read_bytes() == TAR


def test_server_ignoring_range_restarts_decompression_from_the_staged_blob(
    tmp_path: Path,
) -> None:
    lay = Layer(TAR, "zstd")
    client = FakeClient(lay.blob, cut_at=len(lay.blob) // 2, ignore_range=True)
    warm_one(client, spec(lay), DiskTier(tmp_path))
    assert (tmp_path / ("sha256_" + lay.digest[7:])).read_bytes() == TAR
    assert leftovers(tmp_path) == []


def test_a_blob_that_does_not_verify_names_no_entry(tmp_path: Path) -> None:
    lay = Layer(TAR, "gzip")
    corrupt = bytearray(lay.blob)
    corrupt[-20] ^= 0xFF  # inside the last deflate block: inflate may not notice, sha256 does
    with pytest.raises(VerificationError) as err:
        warm_one(FakeClient(bytes(corrupt)), spec(lay), DiskTier(tmp_path))
    assert lay.digest in str(err.value)
    assert entries(tmp_path) == [] and leftovers(tmp_path) == []


def test_wrong_diff_id_names_no_entry_and_drops_the_staged_blob(tmp_path: Path) -> None:
    lay = Layer(TAR, "gzip")
    wrong = LayerSpec(Digest.parse(lay.digest), Digest.parse("sha256:" + "0" * 64),
                      lay.media_type, lay.size, (REF,))
    with pytest.raises(VerificationError, match="diff_id"):
        warm_one(FakeClient(lay.blob), wrong, DiskTier(tmp_path))
    assert entries(tmp_path) == [] and leftovers(tmp_path) == []


def test_a_commit_waiting_on_the_disk_holds_no_cpu_slot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The inflate runs on the CPU pool, the commit (its fsync) on the caller's side: with
    one CPU thread, a second layer is inflated and committed while the first layer's fsync
    is held. Before, the first held the only CPU slot until its fsync returned."""
    first, second = (Layer(random_tar(seed, 2_000_000), "gzip") for seed in (21, 22))
    disk = DiskTier(tmp_path)
    in_fsync, release = threading.Event(), threading.Event()
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if first.digest[7:] in os.readlink(f"/proc/self/fd/{fd}") and not in_fsync.is_set():
            in_fsync.set()  # the first layer's temp file: its commit waits here
            release.wait(60)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with ThreadPoolExecutor(1) as cpu, ThreadPoolExecutor(2) as io:
        try:
            held = io.submit(warm_one, FakeClient(first.blob), spec(first), disk,
                             submit_cpu=cpu.submit)
            assert in_fsync.wait(30), "the first layer never reached its commit"
            other = io.submit(warm_one, FakeClient(second.blob), spec(second), disk,
                              submit_cpu=cpu.submit)
            assert other.result(timeout=30) == len(second.tar)
            assert not held.done(), "the first layer's fsync was released early"
        finally:
            release.set()
        assert held.result(timeout=30) == len(first.tar)
    for lay in (first, second):
        assert (tmp_path / ("sha256_" + lay.digest[7:])).read_bytes() == lay.tar
    assert leftovers(tmp_path) == []


def test_reader_sees_the_end_only_after_finish(tmp_path: Path) -> None:
    growing = GrowingFile()
    path = tmp_path / "blob"
    got: list[bytes] = []
    with open(path, "w+b", buffering=0) as out:
        growing.attach(out.fileno(), 0)
        reader = growing.reader()
        t = threading.Thread(target=lambda: got.extend(iter(lambda: reader.read(4), b"")))
        t.start()
        out.write(b"abcdefgh")
        growing.wrote(8)
        time.sleep(0.2)
        assert t.is_alive(), "the reader stopped before the writer said the file was complete"
        verifier = Verifier(Digest.of_bytes(b"abcdefgh"))
        verifier.update(b"abcdefgh")
        growing.finish(verifier.verify())
        t.join(5)
    assert b"".join(got) == b"abcdefgh"
    assert reader.verdict().digest == Digest.of_bytes(b"abcdefgh")  # the fetch's own proof
    growing.close()


def test_reader_of_a_failed_download_stops_with_stream_abandoned(tmp_path: Path) -> None:
    growing = GrowingFile()
    with open(tmp_path / "blob", "w+b", buffering=0) as out:
        growing.attach(out.fileno(), 0)
        out.write(b"abc")
        growing.wrote(3)
        reader = growing.reader()
        assert reader.read(10) == b"abc"
        growing.fail()
        with pytest.raises(StreamAbandoned):
            reader.read(10)
    growing.close()



# ------------------------------------------------ following a fetch in another process
# The Celery decompress task follows a fetch task's download on the same host
# (stages.decompress_following). The fetch here is the real stages.fetch, run in a child
# process (tests/support/paused_fetch.py) that pauses halfway until the test lets it go on.


class ChildFetch:
    def __init__(self, root: Path, lay: Layer, mode: str) -> None:
        blob = root.parent / f"{root.name}.blob"
        blob.write_bytes(lay.blob)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.paused_fetch", str(root), str(blob),
             lay.digest, lay.diff_id, lay.media_type, mode],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            cwd=Path(__file__).resolve().parents[1])  # fmt: skip
        assert self.proc.stdout is not None and self.proc.stdout.readline() == "half\n"

    def go_on(self) -> int:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.close()
        return self.proc.wait(timeout=60)


def follow_in_thread(
    layer: LayerSpec, disk: DiskTier
) -> tuple[ThreadPoolExecutor, Future[tuple[int, bool] | None]]:
    pool = ThreadPoolExecutor(1)
    return pool, pool.submit(decompress_following, layer, disk)


def output_so_far(root: Path) -> int:
    return sum(p.stat().st_size for p in (root / ".tmp").iterdir())


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_decompression_follows_a_fetch_in_another_process(
    tmp_path: Path, compression: str
) -> None:
    lay = Layer(TAR, compression)
    root = tmp_path / "cache"
    disk = DiskTier(root)
    fetch = ChildFetch(root, lay, "ok")  # paused halfway through the blob
    pool, following = follow_in_thread(spec(lay), disk)
    # While the fetch is paused, the follower has already written decompressed output...
    deadline = time.monotonic() + 30
    while output_so_far(root) == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert output_so_far(root) > 0, "nothing decompressed before the download ended"
    # ... but names no entry before the fetch has verified the blob.
    assert entries(root) == [] and not following.done()
    assert fetch.go_on() == 0
    assert following.result(timeout=60) == (len(TAR), True)
    pool.shutdown()
    assert (root / ("sha256_" + lay.digest[7:])).read_bytes() == TAR
    assert leftovers(root) == []
    assert disk.meta.layer(Digest.parse(lay.digest)) is not None


@pytest.mark.parametrize("mode", ["fail", "corrupt"])
def test_follower_of_a_failed_fetch_names_nothing_and_returns_none(
    tmp_path: Path, mode: str
) -> None:
    lay = Layer(TAR, "gzip")
    root = tmp_path / "cache"
    fetch = ChildFetch(root, lay, mode)
    pool, following = follow_in_thread(spec(lay), DiskTier(root))
    assert fetch.go_on() == 1
    assert following.result(timeout=60) is None
    pool.shutdown()
    assert entries(root) == [] and leftovers(root) == []


def test_follower_of_a_killed_fetch_returns_none_once_its_lock_is_gone(tmp_path: Path) -> None:
    lay = Layer(TAR, "zstd")
    root = tmp_path / "cache"
    fetch = ChildFetch(root, lay, "ok")
    pool, following = follow_in_thread(spec(lay), DiskTier(root))
    fetch.proc.kill()  # the IO worker died mid-download: its flock goes with it
    fetch.proc.wait()
    assert following.result(timeout=60) is None
    pool.shutdown()
    assert entries(root) == []
    # The half-downloaded blob stays for the redelivered fetch to resume; nothing else.
    assert leftovers(root) == ["sha256_" + lay.digest[7:] + ".partial"]


def test_fetch_that_starts_over_still_gives_the_verified_entry(tmp_path: Path) -> None:
    lay = Layer(TAR, "gzip")
    root = tmp_path / "cache"
    fetch = ChildFetch(root, lay, "restart")
    pool, following = follow_in_thread(spec(lay), DiskTier(root))
    assert fetch.go_on() == 0
    size, made = following.result(timeout=60) or (0, False)
    pool.shutdown()
    assert (size, made) == (len(TAR), True)
    assert (root / ("sha256_" + lay.digest[7:])).read_bytes() == TAR
    assert leftovers(root) == []


def test_follower_of_a_blob_with_the_wrong_diff_id_fails_and_drops_it(tmp_path: Path) -> None:
    lay = Layer(TAR, "gzip")
    wrong = LayerSpec(Digest.parse(lay.digest), Digest.parse("sha256:" + "0" * 64),
                      lay.media_type, lay.size, (REF,))
    root = tmp_path / "cache"
    fetch = ChildFetch(root, lay, "ok")
    pool, following = follow_in_thread(wrong, DiskTier(root))
    assert fetch.go_on() == 0
    with pytest.raises(VerificationError, match="diff_id"):
        following.result(timeout=60)
    pool.shutdown()
    assert entries(root) == [] and leftovers(root) == []


def test_follower_after_the_fetch_ended_decompresses_the_staged_blob(tmp_path: Path) -> None:
    lay = Layer(TAR, "zstd")
    root = tmp_path / "cache"
    assert ChildFetch(root, lay, "ok").go_on() == 0  # queued behind others: fetch is done
    assert decompress_following(spec(lay), DiskTier(root)) == (len(TAR), True)
    assert (root / ("sha256_" + lay.digest[7:])).read_bytes() == TAR
    assert leftovers(root) == []
    # A second follower (another job's) finds the entry made by the first.
    assert decompress_following(spec(lay), DiskTier(root)) == (len(TAR), False)


def test_a_decompression_waits_its_turn_only_behind_a_blob_that_is_ready(tmp_path: Path) -> None:
    lay, other = Layer(TAR, "gzip"), Layer(random_tar(12, 100_000), "gzip")
    disk = DiskTier(tmp_path)
    disk.staging_dir.mkdir(parents=True)
    mine = disk.staging_path(Digest.parse(lay.digest))
    assert not better_later(spec(lay), disk), "no download running yet: follow it"
    partial_path(mine).write_bytes(lay.blob[:1000])  # its download is running
    assert not better_later(spec(lay), disk), "nothing else is ready: follow it"
    theirs = disk.staging_path(Digest.parse(other.digest))
    partial_path(theirs).write_bytes(other.blob[:10])
    assert not better_later(spec(lay), disk), "the other one is still downloading too"
    partial_path(theirs).rename(theirs)  # the other download is verified and staged whole
    assert better_later(spec(lay), disk)
    partial_path(mine).rename(mine)  # and now this one too: nothing to wait for
    assert not better_later(spec(lay), disk)
