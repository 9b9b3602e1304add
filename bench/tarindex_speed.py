"""How fast the tar indexer runs, against a plain sha256 of the same bytes.

    PYTHONPATH=$PWD python -m bench.tarindex_speed [MiB]

Builds random-content tars in memory (a few large files; a base-image-like mix of small
ones) and feeds each in 1 MiB chunks, as the decompress stage produces them. The plain
sha256 is what the decompress stage already pays to verify the diff_id: the indexer's
cost is a second pass of about that price (a third over files larger than CHUNK_SIZE,
whose chunks are hashed too).
"""

from __future__ import annotations

import hashlib
import io
import random
import sys
import tarfile
import time

from pipeline.digest import Digest
from pipeline.tarindex import TarIndexer

FEED = 1 << 20


def make_tar(total: int, sizes: list[int], rng: random.Random) -> bytes:
    out = io.BytesIO()
    blob = rng.randbytes(max(sizes))
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        written, i = 0, 0
        while written < total:
            size = sizes[i % len(sizes)]
            ti = tarfile.TarInfo(f"dir{i % 97}/file{i}")
            ti.size = size
            start = rng.randrange(len(blob) - size + 1)
            tar.addfile(ti, io.BytesIO(blob[start:start + size]))
            written += size + 512
            i += 1
    return out.getvalue()


def best_of(runs: int, fn) -> float:  # noqa: ANN001 - a callable of no arguments
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    mib = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    rng = random.Random(14)
    cases = {
        "large files (16 MiB each)": [16 << 20],
        "mixed (1 KiB .. 2 MiB)": [1 << 10, 4 << 10, 16 << 10, 64 << 10, 300 << 10, 2 << 20],
        "small files (4 KiB each)": [4 << 10],
    }
    diff_id = Digest.of_bytes(b"bench")
    for name, sizes in cases.items():
        tar = make_tar(mib << 20, sizes, rng)
        view = memoryview(tar)
        chunks = [view[i:i + FEED] for i in range(0, len(tar), FEED)]
        count = 0

        def plain(chunks: list[memoryview] = chunks) -> None:
            h = hashlib.sha256()
            for c in chunks:
                h.update(c)

        def index(chunks: list[memoryview] = chunks) -> None:
            nonlocal count
            indexer = TarIndexer(diff_id)
            for c in chunks:
                indexer.feed(c)
            count = len(indexer.finish().entries)

        t_plain, t_index = best_of(3, plain), best_of(3, index)
        mb = len(tar) / 1e6
        print(f"{name}: {len(tar) / 2**20:.0f} MiB, {count} entries: "
              f"indexer {mb / t_index:.0f} MB/s, plain sha256 {mb / t_plain:.0f} MB/s "
              f"(indexer/sha256 time {t_index / t_plain:.2f}x)")


if __name__ == "__main__":
    main()
