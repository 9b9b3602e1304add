"""Codecs on real compressed data, and the disk tier's atomic commit and cross-process lock."""

from __future__ import annotations

import gzip
import io
import multiprocessing
import time
import zlib
from pathlib import Path

import pytest
import zstandard

from pipeline.codecs import CHUNK, compression_for, iter_decompressed
from pipeline.digest import Digest, Verified, Verifier
from pipeline.errors import UnsupportedMediaType, VerificationError
from pipeline.layer import FromBlob, LayerSpec, Shared
from pipeline.tiers.disk import DiskTier
from tests.support.images import ALL_HEADER_FIELDS, gzip_member, random_tar

TAR = random_tar(7, 3_000_000)


def _zstd(data: bytes) -> bytes:
    return zstandard.ZstdCompressor().compress(data)


@pytest.mark.parametrize(
    "compression, blob",
    [
        ("gzip", gzip.compress(TAR, mtime=0)),
        ("gzip", gzip.compress(TAR[:1000], mtime=0) + gzip.compress(TAR[1000:], mtime=0)),
        ("gzip", gzip.compress(TAR, mtime=0) + bytes(5000)),
        ("gzip", gzip_member(TAR, *ALL_HEADER_FIELDS)),
        ("zstd", zstandard.ZstdCompressor(write_content_size=False).compress(TAR)),
        ("zstd", _zstd(TAR[:5]) + _zstd(TAR[5:])),
        ("none", TAR),
    ],
    ids=["gzip", "gzip-multimember", "gzip-zero-padding", "gzip-all-header-fields",
         "zstd-no-size", "zstd-two-frames", "plain"],
)
def test_decompressed_bytes_are_the_tar(compression: str, blob: bytes) -> None:
    assert b"".join(iter_decompressed(io.BytesIO(blob), compression, "t")) == TAR  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "compression, blob, message",
    [
        ("gzip", gzip.compress(TAR)[:-2000], "truncated"),
        ("gzip", TAR, "media type says gzip"),
        ("zstd", gzip.compress(TAR), "media type says zstd"),
        ("gzip", gzip.compress(TAR)[:5000] + b"\0garbage" * 100, "gzip"),
        ("gzip", gzip_member(TAR, crc=zlib.crc32(TAR) ^ 1), "corrupt gzip data"),
        ("gzip", gzip_member(TAR, size=len(TAR) + 1), "corrupt gzip data"),
        ("zstd", b"\x28\xb5\x2f\xfd" + b"\xff" * 4000, "corrupt zstd"),
    ],
    ids=["gzip-truncated", "gzip-label-on-tar", "zstd-label-on-gzip", "gzip-junk", "gzip-bad-crc",
         "gzip-bad-length", "zstd-junk"],
)
def test_corrupt_or_mislabelled_input_is_a_verification_error(compression, blob, message) -> None:
    with pytest.raises(VerificationError) as e:
        b"".join(iter_decompressed(io.BytesIO(blob), compression, "layer X"))
    assert message in str(e.value) and "layer X" in str(e.value)


class _HeldEnd:
    """A blob whose last `held` bytes have not arrived: reading them fails the test."""

    def __init__(self, blob: bytes, held: int) -> None:
        self._src, self._left = io.BytesIO(blob), len(blob) - held

    def read(self, n: int = -1) -> bytes:
        if self._left == 0:
            raise AssertionError("read into the held end of the blob")
        data = self._src.read(min(self._left, CHUNK if n < 0 else n))
        self._left -= len(data)
        return data


def test_gzip_output_leaves_in_chunks_before_the_blob_ends() -> None:
    """Each chunk at most CHUNK (the limits are checked between chunks: a bomb is stopped
    early), and the whole tar is out before anything after the stream has been read (the
    tar is inflated while the blob's end is still on its way)."""
    tar = TAR[:200_000] + bytes(40 * CHUNK)  # then ~1000:1, as a bomb compresses
    blob = gzip.compress(tar, mtime=0)
    chunks, out = [], 0
    with pytest.raises(AssertionError, match="held end"):
        for chunk in iter_decompressed(_HeldEnd(blob + bytes(4096), 4096), "gzip", "t"):  # type: ignore[arg-type]
            chunks.append(len(chunk))
            out += len(chunk)
    assert out == len(tar) and max(chunks) <= CHUNK


def test_media_types() -> None:
    assert compression_for("application/vnd.oci.image.layer.v1.tar+zstd") == "zstd"
    assert compression_for("application/vnd.docker.image.rootfs.diff.tar.gzip") == "gzip"
    assert compression_for("application/vnd.oci.image.layer.v1.tar") == "none"
    with pytest.raises(UnsupportedMediaType) as e:
        compression_for("application/vnd.example.weird")
    assert "unsupported media type 'application/vnd.example.weird'" in str(e.value)


DIGEST = Digest.of_bytes(b"layer")
LAYER = LayerSpec(DIGEST, DIGEST, "application/vnd.oci.image.layer.v1.tar", 5)


def proof(data: bytes, digest: Digest | None = None) -> Verified:
    verifier = Verifier(digest or Digest.of_bytes(data))
    verifier.update(data)
    return verifier.verify()


def test_entry_appears_only_on_commit(tmp_path: Path) -> None:
    disk = DiskTier(tmp_path / "c")
    assert not (tmp_path / "c").exists(), "constructing the tier must not write"
    with disk.ingest(DIGEST) as ing:
        ing.file.write(b"half")
        assert not disk.has(DIGEST)
    assert not disk.has(DIGEST) and list(disk.tmp_dir.iterdir()) == []
    with pytest.raises(RuntimeError), disk.ingest(DIGEST) as ing:
        ing.file.write(b"data")
        raise RuntimeError("crash before commit")
    assert not disk.has(DIGEST) and list(disk.tmp_dir.iterdir()) == []
    with disk.ingest(DIGEST) as ing:
        ing.file.write(b"layer")
        ing.commit(LAYER, proof(b"layer"), FromBlob(proof(b"layer")))
    assert disk.path(DIGEST).read_bytes() == b"layer"
    assert disk.path(DIGEST).name == DIGEST.cache_name
    assert disk.path(DIGEST).stat().st_mode & 0o777 == 0o644


def _hold_lock(root: str, seconds: float, ready) -> None:  # noqa: ANN001
    with DiskTier(Path(root)).lock(DIGEST):
        ready.set()
        time.sleep(seconds)


def test_lock_excludes_another_process(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    proc = ctx.Process(target=_hold_lock, args=(str(tmp_path), 1.0, ready))
    proc.start()
    try:
        assert ready.wait(30)
        lock = DiskTier(tmp_path).lock(DIGEST)
        assert not lock.acquire(blocking=False), "lock held by another process must exclude us"
        started = time.monotonic()
        assert lock.acquire()  # waits for the other process to let go
        assert time.monotonic() - started > 0.1
        lock.release()
    finally:
        proc.join(30)


@pytest.mark.parametrize("case", ["tar digest", "tar size", "blob of another digest",
                                  "shared from itself"])
def test_commit_refuses_bytes_without_their_proofs(tmp_path: Path, case: str) -> None:
    """The disk tier's commit is the gate: wrong proofs name nothing and leave no file."""
    disk = DiskTier(tmp_path / "c")
    tar, blob, origin = proof(b"layer"), proof(b"layer"), None
    written = b"layer"
    if case == "tar digest":
        tar = proof(b"other")
    elif case == "tar size":
        written = b"layer!"
    elif case == "blob of another digest":
        blob = proof(b"some other blob")
    else:
        origin = Shared(DIGEST)
    with pytest.raises(VerificationError), disk.ingest(DIGEST) as ing:
        ing.file.write(written)
        ing.commit(LAYER, tar, origin or FromBlob(blob))
    assert not disk.has(DIGEST) and list(disk.tmp_dir.iterdir()) == []
    assert disk.meta.layer(DIGEST) is None


def test_commit_records_where_the_bytes_came_from(tmp_path: Path) -> None:
    disk = DiskTier(tmp_path / "c")
    with disk.ingest(DIGEST) as ing:
        ing.file.write(b"layer")
        ing.commit(LAYER, proof(b"layer"), FromBlob(proof(b"layer")))
    row = disk.meta.layer(DIGEST)
    assert row is not None and row.origin == "blob" and row.diff_id == DIGEST
    other = Digest.of_bytes(b"another blob")
    with disk.ingest(other) as ing:
        ing.file.write(b"layer")
        ing.commit(LayerSpec(other, DIGEST, LAYER.media_type, 12), proof(b"layer"),
                   Shared(DIGEST))
    row = disk.meta.layer(other)
    assert row is not None and row.origin == f"shared:{DIGEST}"
