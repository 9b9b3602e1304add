"""A fetch in a process of its own, for tests of a decompression that follows it.

    python -m tests.support.paused_fetch CACHE BLOB DIGEST DIFF_ID MEDIA_TYPE MODE

Runs the real `stages.fetch` under the digest's lock, as the Celery fetch task does, from a
client that serves the file BLOB in 64 KiB pieces. Halfway through it writes the line
"half" to stdout and waits for a line on stdin before going on, so a test can look at what
the follower did meanwhile, or kill this process there. MODE says how the fetch ends:

    ok        the whole blob, verified and renamed to its staging name
    fail      a permanent error after the pause (the fetch removes its .partial file)
    restart   the connection drops after the pause and the server then ignores Range, so
              the fetch empties its file and writes the blob again from byte 0
    corrupt   byte 9 is flipped: in a gzip blob, the header's OS field, which inflating
              ignores, so only the blob's digest can tell the blob is wrong
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

from pipeline import stages
from pipeline.digest import Digest
from pipeline.errors import NotFound, TransientError, VerificationError
from pipeline.layer import LayerSpec
from pipeline.reference import Reference
from pipeline.retry import RetryPolicy
from pipeline.tiers.disk import DiskTier

PIECE = 64 << 10


class BlobStream:
    """What `RegistryClient.open_blob` returns, from pieces a test client makes up."""

    def __init__(self, offset: int, pieces: Iterator[bytes]) -> None:
        self.offset, self._pieces = offset, pieces

    def iter_chunks(self, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        yield from self._pieces

    def __enter__(self) -> BlobStream:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


class PausingClient:
    retry = RetryPolicy(base=0.01)  # what stages.fetch retries a cut blob by

    def __init__(self, blob: bytes, mode: str) -> None:
        self.blob, self.mode, self.requests = blob, mode, 0

    def open_blob(self, ref: Reference, digest: Digest, *, offset: int = 0) -> BlobStream:
        self.requests += 1
        if self.requests > 1 and self.mode == "restart":
            offset = 0  # ignores Range: the whole blob again
        return BlobStream(offset, self._pieces(offset, first=self.requests == 1))

    def _pieces(self, start: int, first: bool) -> Iterator[bytes]:
        half = len(self.blob) // 2
        for pos in range(start, len(self.blob), PIECE):
            if first and pos >= half:
                print("half", flush=True)
                sys.stdin.readline()
                if self.mode == "fail":
                    raise NotFound("blob went away (test)")
                if self.mode == "restart":
                    raise TransientError("connection lost mid-body (test)")
                first = False
            piece = self.blob[pos:pos + PIECE]
            if self.mode == "corrupt" and pos == 0:
                piece = piece[:9] + bytes([piece[9] ^ 0xFF]) + piece[10:]
            yield piece


def main(argv: list[str]) -> int:
    cache, blob, digest, diff_id, media_type, mode = argv
    data = Path(blob).read_bytes()
    layer = LayerSpec(Digest.parse(digest), Digest.parse(diff_id), media_type, len(data),
                      (Reference.parse("127.0.0.1:5000/test/paused:1"),))
    disk = DiskTier(Path(cache))
    with disk.lock(layer.digest):
        try:
            stages.fetch(PausingClient(data, mode), layer, disk)  # type: ignore[arg-type]
        except (NotFound, VerificationError):
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
