"""What this machine cannot go under for a scenario (issue 16, item 2): the floor.

For a set of layer blobs, measured in the bench's own run, each part over all the blobs,
one blob per worker at a time: ``parallel`` processes (nproc for a fleet) for the CPU
parts, ``io_parallel`` threads (layerwarm's --io-threads for a fleet) for the I/O parts:

    decompress  the blobs to nowhere with the fastest single-thread decompressor here:
                ISA-L (``isal.igzip_lib``, what layerwarm inflates gzip with) for gzip; for
                zstd the faster of ``zstandard`` (layerwarm's) and ``zstd -dcq -T1``
    sha256      ``hashlib.sha256`` over the tar bytes (the decompressed blobs, read from a
                file in the page cache); the digest is checked against the diff_id
    blob sha256 ``hashlib.sha256`` over the blobs (the download's check against the digest)
    transfer    ``curl -s -o /dev/null`` of each blob from the loopback registry (page cache
                dropped first when the scenario is cold, as the registry then reads disk)
    write       the tar's size written to a file in the scratch dir, then fsync

Each part is the fastest of ``repeats`` passes (a floor is what the machine can do, and a
pass slowed by other load says nothing about that), the start-up likewise.

floor = the largest of those parts (they can overlap, nothing makes one of them go away)
plus interpreter start-up (``python3 -c pass``, cold when the scenario is) where the
scenario starts a process.

Where that process asks the registry (a scenario with a transfer part), the start-up of a
process that imports requests, the HTTP library the project's owner fixed for talking to
registries (``python3 -c 'import requests'``, cold when the scenario is), is measured too
and noted with the shared bound it makes: no layerwarm process that asks a registry
anything starts sooner. The floor itself keeps the bare interpreter, as issue 16 defines it.

shared = the parts that each keep a core busy (decompress, both sha256s, write with its
fsync; not transfer, which waits on the registry), added up as core-seconds and spread
perfectly over the machine's cores, plus the start-up: what this machine cannot go under
when the parts overlap as well as they possibly can. It is at least the floor wherever
the cores are fewer than the parts.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from bench.measure import drop_caches, run
from bench.workload import BuiltLayer

CHUNK = 1 << 20
CORE_PARTS = ("decompress", "sha256", "blob sha256", "write")  # each keeps a core busy


@dataclass
class Floor:
    parts: dict[str, float]  # part -> seconds for all the blobs
    start: float = 0.0  # interpreter start-up, 0 where the scenario starts no process
    parallel: int = 1  # processes for decompress and sha256
    how: dict[str, str] = field(default_factory=dict)  # part -> what ran, where it varies
    cold: bool = False  # the start-up and transfer ran on a cold page cache
    repeats: int = 1
    io_parallel: int = 1  # threads for transfer and write
    cores: int = 1  # the machine's
    client_start: float = 0.0  # start-up of `python3 -c 'import requests'`, with a transfer

    @property
    def seconds(self) -> float:
        return max(self.parts.values()) + self.start

    @property
    def shared(self) -> float:
        """See the module's docstring: the busy parts' core-seconds over all the cores."""
        busy = sum(v * min(self.io_parallel if k == "write" else self.parallel, self.cores)
                   for k, v in self.parts.items() if k in CORE_PARTS)
        return max(self.seconds, busy / self.cores + self.start)

    @property
    def client_shared(self) -> float:
        """The shared bound with the start-up of a process that imports requests instead
        of the bare interpreter's (0 where no start-up was measured)."""
        return self.shared - self.start + self.client_start if self.client_start else 0.0

    def note(self) -> str:
        parts = ", ".join(f"{k} {v:.2f} s" + (f" ({self.how[k]})" if k in self.how else "")
                          for k, v in self.parts.items())  # fmt: skip
        biggest = max(self.parts, key=lambda k: self.parts[k])
        start = (f" + interpreter start-up (`python3 -c pass`, page cache "
                 f"{'cold' if self.cold else 'warm'}) {self.start:.2f} s" if self.start else "")
        par = (f"decompress and sha256 {self.parallel} at a time (nproc), transfer and write "
               f"{self.io_parallel} at a time (layerwarm's --io-threads)"
               if self.parallel > 1 else "one thread")
        par += f", each the fastest of {self.repeats} passes"
        client = (f"; a process that imports requests (the registry client's HTTP library) "
                  f"starts in {self.client_start:.2f} s, which makes the shared bound "
                  f"{self.client_shared:.2f} s" if self.client_start else "")
        return (f"floor {self.seconds:.2f} s = largest part ({biggest}){start}; parts, "
                f"{par}: {parts}; shared: the busy parts (all but transfer) spread over "
                f"{self.cores} cores{' + start-up' if self.start else ''} {self.shared:.2f} s"
                + client)


def _inflate(path: str, compression: str, out: str | None = None) -> int:
    """Decompress one blob, discarding the output (or writing it to ``out``)."""
    n = 0
    sink = open(out, "wb") if out else None
    try:
        with open(path, "rb") as f:
            for data in (_gunzip_chunks if compression == "gzip" else _unzstd_chunks)(f):
                n += len(data)
                if sink is not None:
                    sink.write(data)
    finally:
        if sink is not None:
            sink.close()
    return n


def _gunzip_chunks(f: BinaryIO) -> Iterator[bytes]:
    """ISA-L's bz2-style decompressor, a chunk of output at a time: its fastest way (its
    zlib-style one grows each output by doubling). One member: the workload's blobs.
    Written here, not taken from pipeline.codecs, which does the same: the yardstick must
    not move with the code it measures."""
    from isal import igzip_lib

    d = igzip_lib.IgzipDecompressor(flag=igzip_lib.DECOMP_GZIP)
    while not d.eof:
        data = f.read(CHUNK) if d.needs_input else b""
        if d.needs_input and not data:
            break
        yield d.decompress(data, CHUNK)


def _unzstd_chunks(f: BinaryIO) -> Iterator[bytes]:
    import zstandard

    d = zstandard.ZstdDecompressor().decompressobj()
    while chunk := f.read(CHUNK):
        yield d.decompress(chunk)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return "sha256:" + h.hexdigest()


def _write(path: str, size: int) -> None:
    buf = os.urandom(CHUNK)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        left = size
        while left > 0:
            left -= os.write(fd, buf[: min(CHUNK, left)])
        os.fsync(fd)
    finally:
        os.close(fd)


def _wall(pool: Executor, fn: Callable[..., object], *args: Sequence[object]) -> tuple[float,
                                                                                      list]:
    started = time.perf_counter()
    out = list(pool.map(fn, *args))
    return time.perf_counter() - started, out


def measure(
    layers: Sequence[BuiltLayer],
    urls: Sequence[str],
    scratch: Path,
    *,
    parallel: int,
    cold: bool,
    transfer: bool = True,
    write: bool = True,
    start: bool = True,
    repeats: int = 3,
    io_parallel: int | None = None,
) -> Floor:
    """The floor of handling ``layers`` (blob ``urls`` on the registry, in the same order)."""
    io_parallel = io_parallel or parallel
    paths = [str(x.path) for x in layers]
    comps = [x.compression for x in layers]
    tars = [str(scratch / f"{x.hex}.tar") for x in layers]
    scratch.mkdir(parents=True, exist_ok=True)
    parts: dict[str, float] = {}
    how: dict[str, str] = {}
    try:
        with ProcessPoolExecutor(parallel) as procs:
            list(procs.map(_noop_arg, range(parallel)))  # the workers exist before timing
            # the tars to hash (not timed); then the same blobs again, timed, to nowhere
            sizes = list(procs.map(_inflate, paths, comps, tars))
            for lay, n in zip(layers, sizes, strict=True):
                if n != lay.uncompressed_size:
                    raise AssertionError(f"floor: {lay.digest} inflated to {n} bytes, "
                                         f"want {lay.uncompressed_size}")
            parts["decompress"] = min(_wall(procs, _inflate, paths, comps)[0]
                                      for _ in range(repeats))
            how["decompress"] = "ISA-L" if set(comps) == {"gzip"} else "zstandard"
            if set(comps) == {"zstd"}:
                cli = float("inf")
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    with ThreadPoolExecutor(parallel) as threads:
                        list(threads.map(lambda p: run(["zstd", "-dcq", "-T1", p],
                                                       stdout_path=Path(os.devnull)), paths))
                    cli = min(cli, time.perf_counter() - t0)
                if cli < parts["decompress"]:
                    parts["decompress"], how["decompress"] = cli, "zstd -dcq -T1"
                how["decompress"] += "; zstandard and zstd -T1 both ran, the faster counts"
            parts["sha256"], digests = _wall(procs, _sha256, tars)
            for _ in range(repeats - 1):
                parts["sha256"] = min(parts["sha256"], _wall(procs, _sha256, tars)[0])
            for lay, dig in zip(layers, digests, strict=True):
                if dig != lay.diff_id:
                    raise AssertionError(f"floor: sha256 of {lay.digest}'s tar is not its diff_id")
            parts["blob sha256"], digests = _wall(procs, _sha256, paths)
            for _ in range(repeats - 1):
                parts["blob sha256"] = min(parts["blob sha256"], _wall(procs, _sha256, paths)[0])
            if digests != [x.digest for x in layers]:
                raise AssertionError("floor: sha256 of a blob is not its digest")
        for t in tars:
            os.unlink(t)
        with ThreadPoolExecutor(io_parallel) as threads:
            if write:
                outs = [str(scratch / f"{x.hex}.out") for x in layers]
                sizes = [x.uncompressed_size for x in layers]
                parts["write"] = float("inf")
                for _ in range(repeats):
                    parts["write"] = min(parts["write"], _wall(threads, _write, outs, sizes)[0])
                    for o in outs:
                        os.unlink(o)
            if transfer:
                parts["transfer"] = float("inf")
                for _ in range(repeats):
                    if cold:
                        drop_caches()
                    parts["transfer"] = min(parts["transfer"], _wall(
                        threads, lambda u: run(["curl", "-sf", "-o", os.devnull, u]), urls)[0])
                how["transfer"] = "curl, registry's page cache " + ("cold" if cold else "warm")
        started = client = 0.0
        if start:
            started = _fastest(repeats, cold, [sys.executable, "-c", "pass"])
        if start and transfer:  # the scenario's process asks the registry
            client = _fastest(repeats, cold, [sys.executable, "-c", "import requests"])
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return Floor(parts, started, parallel, how, cold, repeats, io_parallel,
                 os.cpu_count() or 1, client)


def _fastest(repeats: int, cold: bool, argv: list[str]) -> float:
    """The fastest of `repeats` runs of a command, each from a cold page cache if `cold`."""
    best = float("inf")
    for _ in range(repeats):
        if cold:
            drop_caches()
        best = min(best, run(argv).seconds)
    return best


def _noop_arg(_: int) -> None:
    return None
