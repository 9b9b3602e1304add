"""What the reading scenarios (11-15, ``bench.scenarios.reading``) build and run: the
environment of a `layerwarm` child running this checkout's code, the images made for
scenarios 14 and 15, a small file picked from a built layer, a FUSE mount held open, and
S3 traffic counted through the tests' ``S3Proxy``.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bench import REPO_ROOT
from bench.workload import BuiltLayer, MiB
from tests.support.cli import layerwarm_cmd, layerwarm_env
from tests.support.images import Layer
from tests.support.proxy import Hit
from tests.support.tars import Dir, File, make_tar

MOUNT_WAIT = 120.0


def lw_env(cache: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """``layerwarm_env`` with this checkout first on PYTHONPATH: the `layerwarm` children
    import its pipeline/ and workers/, whatever an editable install elsewhere points at."""
    env = layerwarm_env(cache, extra)
    rest = env.get("PYTHONPATH", "")
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + rest if rest else "")
    return env


def code_path_check(scratch: Path) -> str:
    """Where a child started as the scenarios start `layerwarm` imports pipeline/ and
    workers/ from (run from another directory, so only the environment can put it right);
    raises unless it is this checkout."""
    probe = ("import pipeline, workers; print(pipeline.__file__); print(workers.__file__)")
    out = subprocess.run([sys.executable, "-c", probe], env=lw_env(scratch / "probe-cache"),
                         cwd=scratch, capture_output=True, text=True, check=True).stdout
    paths = out.split()
    if not all(Path(p).resolve().is_relative_to(REPO_ROOT) for p in paths):
        raise AssertionError(f"`layerwarm` children would import {paths}, not {REPO_ROOT}")
    return str(REPO_ROOT)


def seqread_layer(size: int, seed: int) -> tuple[Layer, str, bytes]:
    """One uncompressed layer holding one file of ``size`` random bytes (compression would
    not shrink it): the layer, the file's path, its bytes."""
    data = random.Random(f"layerwarm-bench|{seed}|seqread").randbytes(size)
    path = "data/big.bin"
    return Layer(make_tar([Dir("data"), File(path, data)]), "none"), path, data


def small_file(lay: BuiltLayer, limit: int = 64 * 1024) -> tuple[str, bytes]:
    """A regular file of at most ``limit`` bytes from the middle of the layer's tar (the
    first such file past half the tar), read from the blob built for it."""
    assert lay.path is not None
    mode = "r|gz" if lay.compression == "gzip" else "r|"
    with tarfile.open(lay.path, mode) as tar:
        for info in tar:
            if info.isreg() and 0 < info.size <= limit and \
                    info.offset >= lay.uncompressed_size // 2:
                f = tar.extractfile(info)
                assert f is not None
                return info.name, f.read()
    raise AssertionError(f"no file of at most {limit} bytes in the second half of {lay.key}")


def s3_bytes(hits: list[Hit]) -> tuple[int, int, int]:
    """(all bytes S3 sent, bytes of `.index` objects, requests) from a proxy's log."""
    index = sum(h.bytes_sent for h in hits if h.path.split("?")[0].endswith(".index"))
    return sum(h.bytes_sent for h in hits), index, len(hits)


@dataclass
class Mounted:
    proc: subprocess.Popen[bytes]
    started: float  # time.perf_counter() just before the mount process was started
    ready: float    # ... when os.path.ismount first said yes


@contextmanager
def mounted(image: str, mp: Path, cache: Path, env: Mapping[str, str] | None = None,
            args: tuple[str, ...] = ()) -> Iterator[Mounted]:
    """`layerwarm mount IMAGE MP --foreground` until the block ends (then SIGTERM, which
    unmounts; `fusermount3 -u -z` if it does not)."""
    mp.mkdir(parents=True, exist_ok=True)
    argv = layerwarm_cmd("mount", image, str(mp), "--foreground", *args)
    log = mp.with_name(mp.name + ".stderr")
    with open(log, "wb") as err:  # a file, not a pipe nobody reads while it runs
        started = time.perf_counter()
        proc = subprocess.Popen(argv, env=lw_env(cache, env), cwd=REPO_ROOT,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + MOUNT_WAIT
        while not os.path.ismount(mp):
            if proc.poll() is not None:
                tail = log.read_bytes()[-2000:].decode(errors="replace")
                raise AssertionError(f"mount exited {proc.returncode}: {tail}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{mp} not mounted within {MOUNT_WAIT:.0f} s")
            time.sleep(0.002)
        yield Mounted(proc, started, time.perf_counter())
    finally:
        unmount(proc, mp)


def unmount(proc: subprocess.Popen[bytes], mp: Path) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            subprocess.run(["fusermount3", "-u", "-z", str(mp)], check=False)
            proc.kill()
            proc.wait()
    if os.path.ismount(mp):
        subprocess.run(["fusermount3", "-u", "-z", str(mp)], check=False)


def read_seconds(path: Path, buf: int = MiB) -> float:
    """Seconds to read ``path`` to its end with ``buf``-byte reads, in this process."""
    b = bytearray(buf)
    with open(path, "rb", buffering=0) as f:
        started = time.perf_counter()
        while f.readinto(b):
            pass
        return time.perf_counter() - started


def import_seconds(importtime_stderr: str) -> float:
    """Total of the top-level cumulative times `python3 -X importtime` printed."""
    total = 0
    for line in importtime_stderr.splitlines():
        parts = line.split("|")
        if line.startswith("import time:") and len(parts) == 3 and parts[1].strip().isdigit():
            if not parts[2].startswith("  "):  # top level: its children are in its sum
                total += int(parts[1])
    return total / 1e6


def mib_s(nbytes: int, seconds: float) -> str:
    return f"{nbytes / MiB / seconds:.0f} MiB/s"
