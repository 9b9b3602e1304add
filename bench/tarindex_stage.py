"""What the indexer adds to the decompress stage, inline or on a thread of its own.

    PYTHONPATH=$PWD python -m bench.tarindex_stage DIR

Tars DIR (a real tree: a layer's mix of sizes and content), gzips it, then times ISA-L
inflate + sha256 (the stage's own work, without the disk write), the same with the
indexer fed each chunk on the same thread, and with the indexer on its own thread
behind a bounded queue (as pipeline/sinks.py hashes). For the lead wiring it in: only
the last can come near the 5 % budget, and only with a core to spare.
"""

from __future__ import annotations

import hashlib
import io
import queue
import sys
import tarfile
import threading
import time
from collections.abc import Callable

from isal import igzip

from pipeline.codecs import iter_decompressed
from pipeline.digest import Digest
from pipeline.tarindex import TarIndexer

DIFF_ID = Digest.of_bytes(b"bench")


def main() -> None:
    src = sys.argv[1]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.add(src, arcname=".")
    raw = buf.getvalue()
    gz = igzip.compress(raw, 3)

    def chunks() -> object:
        return iter_decompressed(io.BytesIO(gz), "gzip", "bench")

    def base() -> None:
        h = hashlib.sha256()
        for c in chunks():
            h.update(c)

    def inline() -> None:
        h, indexer = hashlib.sha256(), TarIndexer(DIFF_ID)
        for c in chunks():
            h.update(c)
            indexer.feed(c)
        indexer.finish()

    def threaded() -> None:
        h, indexer, q = hashlib.sha256(), TarIndexer(DIFF_ID), queue.Queue(8)

        def work() -> None:
            while (c := q.get()) is not None:
                indexer.feed(c)

        worker = threading.Thread(target=work)
        worker.start()
        for c in chunks():
            h.update(c)
            q.put(c)
        q.put(None)
        worker.join()
        indexer.finish()

    indexer = TarIndexer(DIFF_ID)
    indexer.feed(raw)
    count = len(indexer.finish().entries)
    print(f"{src}: {len(raw) >> 20} MiB tar, {count} entries, gzip {len(gz) >> 20} MiB")
    runs: dict[str, Callable[[], None]] = {
        "inflate + sha256": base, "+ indexer inline": inline, "+ indexer thread": threaded}
    first = None
    for name, fn in runs.items():
        best = min(_timed(fn) for _ in range(3))
        first = first or best
        print(f"  {name}: {best * 1000:.0f} ms, {len(raw) / best / 1e6:.0f} MB/s "
              f"({best / first - 1:+.0%})")


def _timed(fn: Callable[[], None]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


if __name__ == "__main__":
    main()
