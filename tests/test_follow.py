"""Decompression that follows a download (pipeline/follow.py, materialize.fetch_and_decompress).

The fast path must give the same bytes and digests as fetching then decompressing, and
must never name an entry from a blob that did not verify. The blob source here is a fake
registry client so each failure (a slow body, a cut connection, a server ignoring Range,
a corrupt byte) happens exactly where the test wants it; the real registry path is covered
by every warm test, which goes through the same function.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pipeline.digest import Digest
from pipeline.errors import TransientError, VerificationError
from pipeline.follow import GrowingFile, StreamAbandoned
from pipeline.materialize import fetch_and_decompress
from pipeline.reference import Reference
from pipeline.stages import LayerSpec
from pipeline.tiers.disk import DiskTier
from tests.support.images import Layer, random_tar

TAR = random_tar(11, 5_000_000)
REF = Reference.parse("127.0.0.1:5000/app:1")


class _Stream:
    def __init__(self, body: bytes, offset: int, chunks: Iterator[bytes]) -> None:
        self.offset, self._chunks, self.length = offset, chunks, len(body)

    def iter_chunks(self, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        yield from self._chunks

    def __enter__(self) -> _Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


class FakeClient:
    """Serves one blob in small chunks, with faults on the first request if asked."""

    def __init__(self, blob: bytes, *, cut_at: int | None = None, ignore_range: bool = False,
                 delay: float = 0.0) -> None:
        self.blob, self.cut_at, self.ignore_range, self.delay = blob, cut_at, ignore_range, delay
        self.requests: list[int] = []

    def open_blob(self, ref: Reference, digest: Digest, *, offset: int = 0) -> _Stream:
        self.requests.append(offset)
        first = len(self.requests) == 1
        start = 0 if self.ignore_range else offset
        return _Stream(self.blob, start, self._chunks(start, first))

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
        growing.finish()
        t.join(5)
    assert b"".join(got) == b"abcdefgh"
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

