"""Periodic gc on a real fleet: `layerwarm beat` (real celery beat) sends the gc fan-out on
a short interval, it reaches every live node's own IO queue, and each node's disk shrinks
to its quota (LAYERWARM_MAX_CACHE_SIZE, watermarks) keeping its most recently used layers.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from pathlib import Path

from pipeline import gc
from pipeline.config import Settings
from pipeline.metadata import Metadata
from pipeline.tiers.disk import DiskTier
from pipeline.units import parse_size
from tests.support.fleet import REPO_ROOT, Fleet, broker_url_for, cli_cmd

GC_DB = 12  # this module's fleet's Redis database (flushed at start)
NODES = ("gc1", "gc2")
SIZE = 2000  # bytes per entry
QUOTA = {"LAYERWARM_MAX_CACHE_SIZE": "5000"}  # high 4500, low 4000: two entries stay


def _seed(cache_dir: Path, node: str, count: int) -> list[str]:
    """`count` entries, oldest first (no rows: gc adopts them with their mtime as last use)."""
    names = []
    for i in range(count):
        data = f"{node}-{i}".encode() * (SIZE // len(f"{node}-{i}") + 1)
        data = data[:SIZE]
        name = "sha256_" + hashlib.sha256(data + b"!").hexdigest()
        (cache_dir / name).write_bytes(data)
        os.utime(cache_dir / name, (time.time() - 1000 + i,) * 2)
        names.append(name)
    return names


def _entries(cache_dir: Path) -> set[str]:
    return {p.name for p in cache_dir.iterdir() if p.name.startswith("sha256_")}


def test_beat_has_every_node_gc_its_disk_to_its_quota(tmp_path: Path, redis_url: str) -> None:
    fleet = Fleet(tmp_path / "fleet", NODES, broker_url_for(redis_url, GC_DB), extra_env=QUOTA)
    with fleet:
        seeded = {n: _seed(fleet.cache_dir(n), n, 4) for n in NODES}  # 8000 bytes each
        beat_log = tmp_path / "beat.log"
        with open(beat_log, "wb") as log:
            beat = subprocess.Popen(
                cli_cmd("beat", "--schedule", str(tmp_path / "beat-schedule")),
                env=fleet.env({"LAYERWARM_GC_INTERVAL": "1s"}), cwd=REPO_ROOT,
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        try:
            deadline = time.monotonic() + 60
            want = {n: set(seeded[n][2:]) for n in NODES}  # the two most recently used
            while {n: _entries(fleet.cache_dir(n)) for n in NODES} != want:
                assert beat.poll() is None, beat_log.read_text()[-3000:]
                assert time.monotonic() < deadline, (
                    f"nodes not collected: {[_entries(fleet.cache_dir(n)) for n in NODES]}\n"
                    f"beat: {beat_log.read_text()[-2000:]}\n{fleet.logs()}"
                )
                time.sleep(0.5)
        finally:
            beat.terminate()
            beat.wait(timeout=15)
        for n in NODES:
            counters = Metadata(fleet.cache_dir(n) / ".meta.db").counters()
            assert counters["evictions"] == 2 and counters["evicted_bytes"] == 2 * SIZE
            for name in seeded[n][2:]:  # what stayed is untouched
                data = (fleet.cache_dir(n) / name).read_bytes()
                assert "sha256_" + hashlib.sha256(data + b"!").hexdigest() == name
        assert "layerwarm.gc_all_nodes" in beat_log.read_text()


def test_scheduled_gc_does_nothing_without_a_quota(tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    names = _seed(cache_dir, "solo", 3)
    stale = cache_dir / ".tmp"
    stale.mkdir()
    (stale / "old").write_bytes(b"x")
    os.utime(stale / "old", (time.time() - 86400,) * 2)
    disk = DiskTier(cache_dir)
    assert gc.scheduled_collect(disk, Settings(cache_dir=cache_dir)) is None
    assert _entries(cache_dir) == set(names) and (stale / "old").exists()
    assert not (cache_dir / ".meta.db").exists()

    # With a quota but below its high watermark: nothing evicted, old temp files swept.
    quota = parse_size("10000")
    report = gc.scheduled_collect(disk, Settings(cache_dir=cache_dir, max_cache_size=quota))
    assert report is not None and report.evicted == [] and not (stale / "old").exists()
    assert _entries(cache_dir) == set(names)
