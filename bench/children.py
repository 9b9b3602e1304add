"""Small programs the harness runs as child processes (``python -m bench.children ...``).

    decompress ROOT DIGEST DIFF_ID MEDIA_TYPE SIZE
        layerwarm's whole decompress stage for one staged blob, in one process
        (``pipeline.stages.decompress`` into a ``DiskTier`` at ROOT, whose ``.staging/``
        already holds the blob: inflate, verify the diff_id, write, fsync, rename); prints
        {"seconds", "size", "index_seconds"} as JSON, timing only the call (not interpreter
        start-up); index_seconds is the file index's own work on the committed tar, timed
        alone after the call (fed in the stage's chunks, finished, serialised; best of 3).

    decompress-noindex ROOT DIGEST DIFF_ID MEDIA_TYPE SIZE
        the same stage without the file index (scenario 11's baseline): what
        ``decompress`` + ``decompress_stream`` do, step for step (open the staged blob,
        hash it as it is read, ``disk.space_guard`` + ``disk.ingest`` +
        ``inflate_verified(index=None)`` + ``ingest.commit`` with the blob's verdict, unlink
        the staged blob), minus ``IndexBuild`` and its ``store``; prints {"seconds", "size"}.

    inflate BLOB DIGEST DIFF_ID MEDIA_TYPE SIZE
        the same stage's inflate + diff_id verification (``pipeline.stages.inflate_verified``,
        the function ``decompress`` runs) with the output going to /dev/null, as the
        peer's does; prints {"seconds", "size"}.

    s3get --bucket B --out DIR --concurrency N KEY...
        the peer of restoring from S3: boto3 ``download_file`` of each key into DIR, N at
        a time, as a user would write it (default TransferConfig). The endpoint and
        credentials come from the environment (``AWS_ENDPOINT_URL_S3`` ...).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _spec(args: argparse.Namespace) -> Any:
    from pipeline.digest import Digest
    from pipeline.layer import LayerSpec

    return LayerSpec(Digest.parse(args.digest), Digest.parse(args.diff_id), args.media_type,
                     args.size)


def _timed(call: Callable[[], int], **after: Callable[[], float]) -> int:
    """Run `call`, print {"seconds", "size"} of it as JSON (only the call is timed), and
    the value of each of `after`, called once the call is done, under its name."""
    started = time.perf_counter()
    size = call()
    out: dict[str, float] = {"seconds": time.perf_counter() - started, "size": size}
    out.update((name, measure()) for name, measure in after.items())
    print(json.dumps(out))
    return 0


def _preload_index_modules() -> None:
    """The indexer's modules, imported before the timed call by both decompress modes: a
    worker imports them once per process, not once per layer (scenario 11 compares the
    stage's per-layer cost)."""
    import zstandard  # noqa: F401 - the index's stored form

    from pipeline import fileindex, tarindex  # noqa: F401


def cmd_decompress(args: argparse.Namespace) -> int:
    from pipeline.stages import decompress
    from pipeline.tiers.disk import DiskTier

    _preload_index_modules()
    spec = _spec(args)
    disk = DiskTier(Path(args.root))
    return _timed(lambda: decompress(spec, disk, disk.staging_path(spec.digest)),
                  index_seconds=lambda: _index_alone(spec, disk))


def _index_alone(spec: Any, disk: Any, repeat: int = 3) -> float:
    """Seconds the file index's own work takes for the committed tar: an IndexBuild fed it in
    the stage's chunks, finished and serialised (reading the tar is not timed). Timed after
    the stage, alone, so the figure is not mixed with the stage's threads and disk; the
    best of `repeat` runs, as for any timing of a few milliseconds on a shared machine."""
    from pipeline.codecs import CHUNK
    from pipeline.indexing import IndexBuild

    best = float("inf")
    for _ in range(repeat):
        index, spent = IndexBuild(spec), 0.0
        with open(disk.path(spec.digest), "rb") as tar:
            while chunk := tar.read(CHUNK):
                started = time.perf_counter()
                index.feed(chunk)
                spent += time.perf_counter() - started
        started = time.perf_counter()
        built = index.finish()
        if built is None:
            raise SystemExit(f"the index of {spec.digest} failed: {index.failure}")
        built.dumps()
        best = min(best, spent + time.perf_counter() - started)
    return best


def cmd_decompress_noindex(args: argparse.Namespace) -> int:
    from pipeline.follow import VerifyingReader
    from pipeline.layer import FromBlob
    from pipeline.nofollow import open_file
    from pipeline.stages import inflate_verified
    from pipeline.tiers.disk import DiskTier

    _preload_index_modules()
    spec = _spec(args)
    disk = DiskTier(Path(args.root))
    staging = disk.staging_path(spec.digest)

    def stage() -> int:
        fd = open_file(staging, what="staged layer blob")
        with open(fd, "rb") as f:
            src = VerifyingReader(f, spec.digest, spec.size)
            with disk.space_guard(), disk.ingest(spec.digest) as ingest:
                tar = inflate_verified(spec, src, ingest.file)  # index=None
                ingest.commit(spec, tar, FromBlob(src.verdict()))
        staging.unlink(missing_ok=True)
        return tar.size

    return _timed(stage)


def cmd_inflate(args: argparse.Namespace) -> int:
    from pipeline.stages import inflate_verified

    spec = _spec(args)
    with open(args.blob, "rb") as src, open(os.devnull, "wb") as out:
        return _timed(lambda: inflate_verified(spec, src, out).size)


def cmd_s3get(args: argparse.Namespace) -> int:
    from concurrent.futures import ThreadPoolExecutor

    import boto3
    from botocore.config import Config

    s3 = boto3.client("s3", config=Config(max_pool_connections=max(10, args.concurrency * 10)))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def one(key: str) -> None:
        s3.download_file(args.bucket, key, str(out / key.rsplit("/", 1)[-1]))

    with ThreadPoolExecutor(args.concurrency) as pool:
        list(pool.map(one, args.keys))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.children")
    sub = parser.add_subparsers(required=True)
    d = sub.add_parser("decompress")
    d.add_argument("root")
    d.add_argument("digest")
    d.add_argument("diff_id")
    d.add_argument("media_type")
    d.add_argument("size", type=int)
    d.set_defaults(func=cmd_decompress)
    n = sub.add_parser("decompress-noindex")
    for name in ("root", "digest", "diff_id", "media_type"):
        n.add_argument(name)
    n.add_argument("size", type=int)
    n.set_defaults(func=cmd_decompress_noindex)
    i = sub.add_parser("inflate")
    for name in ("blob", "digest", "diff_id", "media_type"):
        i.add_argument(name)
    i.add_argument("size", type=int)
    i.set_defaults(func=cmd_inflate)
    g = sub.add_parser("s3get")
    g.add_argument("--bucket", required=True)
    g.add_argument("--out", required=True)
    g.add_argument("--concurrency", type=int, default=16)
    g.add_argument("keys", nargs="+")
    g.set_defaults(func=cmd_s3get)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
