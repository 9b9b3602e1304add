"""The chain's gates on Celery: real `layerwarm worker` processes, real Redis, S3.

The same gates as test_chain_gates.py (a corrupt byte after the compressed stream, a
poisoned remote object), the drifts the separate stage tasks had (a truncated entry
published, a staged blob gc removed between fetch and decompress), and a worker that
cannot work fails its layers with the reason instead of leaving the job pending.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.test_chain_gates import HELD, TrailingLayer, wait_for_output
from tests.support.cli import run_layerwarm
from tests.support.fleet import Fleet, broker_url_for, push, running_fleet
from tests.support.fleetcheck import S3Tier, cache_name
from tests.support.images import Image, Layer, random_tar
from tests.support.proxy import Proxy
from tests.support.registry import RegistryServer
from tests.support.s3 import S3Server

GATES_DB = 12    # this module's fleet (flushed when it starts)
VISIBILITY_TIMEOUT = 60  # the sweeper would step in only after 2 x this


@pytest.fixture(scope="module")
def tier(s3: S3Server) -> S3Tier:
    return S3Tier.new(s3, "gates")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, redis_url: str, s3: S3Server,
          tier: S3Tier) -> Iterator[Fleet]:
    """One node, "a", with S3 as the shared tier."""
    with running_fleet(tmp_path_factory.mktemp("gates"), ["a"],
                       broker_url_for(redis_url, GATES_DB), tier, s3.env(),
                       visibility_timeout=VISIBILITY_TIMEOUT) as f:
        yield f


def rows(cache_dir: Path) -> set[str]:
    with sqlite3.connect(cache_dir / ".meta.db") as conn:
        return {r[0] for r in conn.execute("SELECT digest FROM layers")}


def submit(fleet: Fleet, *args: str, timeout: float = 120) -> tuple[int, str]:
    p = fleet.submit(*args, "--wait", timeout=timeout)
    return p.returncode, p.stdout + p.stderr


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_a_corrupt_byte_after_the_stream_names_no_entry_on_a_worker(
    fleet: Fleet, registry: RegistryServer, registry_proxy: Proxy, tier: S3Tier,
    compression: str,
) -> None:
    """The CPU worker has inflated the whole tar while the blob's held end, with the
    flipped byte, has not arrived: it must not commit before the fetch's verdict."""
    lay = TrailingLayer(random_tar(4600 if compression == "gzip" else 4650, 300_000),
                        compression)
    [ref] = push(registry, registry_proxy, [Image([lay])])
    registry_proxy.flip_byte(f"/blobs/{lay.digest}", lay.size - 1)
    hold = registry_proxy.hold(f"/blobs/{lay.digest}", HELD)
    try:
        job_id = fleet.submit_id(ref, "--to", "node:a")
        hold.wait(timeout=60)
        if compression == "gzip":  # zstd's reader wants more input before its last output
            wait_for_output(fleet.cache_dir("a"), lay)
        hold.release()
        status = fleet.wait_done(job_id, timeout=120)[job_id]
    finally:
        hold.release()
        registry_proxy.clear_rules()
    [x] = status["layers"]
    assert x["state"] == "failed" and "digest mismatch" in x["reason"], x
    assert not (fleet.cache_dir("a") / cache_name(lay)).exists()
    assert lay.digest not in rows(fleet.cache_dir("a"))
    assert cache_name(lay) not in tier.objects()


def test_a_poisoned_remote_object_is_replaced_for_the_fleet(
    fleet: Fleet, registry: RegistryServer, registry_proxy: Proxy, tier: S3Tier,
) -> None:
    attacker = Layer(random_tar(4700, 120_000), "gzip")
    victim = Layer(random_tar(4701, 120_000), "gzip")
    [ref] = push(registry, registry_proxy, [Image([victim])])
    tier.s3.client().put_object(
        Bucket=tier.bucket, Key=f"{tier.prefix}/{cache_name(victim)}", Body=attacker.tar,
        Metadata={"diff-id": attacker.diff_id, "media-type": victim.media_type,
                  "compressed-size": str(victim.size),
                  "uncompressed-size": str(len(attacker.tar))})

    code, out = submit(fleet, ref, "--to", "remote")
    assert code == 0, out
    assert tier.objects()[cache_name(victim)] == victim.tar
    assert registry_proxy.count("GET", f"/blobs/{victim.digest}") == 1


def test_a_truncated_entry_is_not_published_for_the_fleet(
    fleet: Fleet, registry: RegistryServer, registry_proxy: Proxy, tier: S3Tier,
) -> None:
    """The fleet target checks the disk entry as a hit is checked, not only its name."""
    lay = Layer(random_tar(4800, 400_000), "gzip")
    [ref] = push(registry, registry_proxy, [Image([lay])])
    code, out = submit(fleet, ref, "--to", "node:a")
    assert code == 0, out
    entry = fleet.cache_dir("a") / cache_name(lay)
    os.truncate(entry, 1000)
    tier.s3.client().delete_object(Bucket=tier.bucket, Key=f"{tier.prefix}/{cache_name(lay)}")

    code, out = submit(fleet, ref, "--to", "remote")
    assert code == 0, out
    assert tier.objects()[cache_name(lay)] == lay.tar
    assert entry.read_bytes() == lay.tar


def test_a_staged_blob_gc_removed_before_its_decompress_is_fetched_again(
    fleet: Fleet, registry: RegistryServer, registry_proxy: Proxy, tier: S3Tier,
) -> None:
    """The CPU worker is stopped while the fetch stages the blob; gc then removes it. The
    decompress finds nothing to decompress, and the job still ends well before the
    sweeper (2 x visibility timeout) would have stepped in."""
    lay = Layer(random_tar(4900, 600_000), "gzip")
    [ref] = push(registry, registry_proxy, [Image([lay])])
    cpu = fleet.worker_tree("a", "cpu")
    staged = fleet.cache_dir("a") / ".staging" / cache_name(lay)
    for p in cpu:
        p.signal(signal.SIGSTOP)
    try:
        job_id = fleet.submit_id(ref, "--to", "node:a")
        deadline = time.monotonic() + 60
        while not staged.exists():
            assert time.monotonic() < deadline, "the fetch never staged the blob"
            time.sleep(0.1)
        p = run_layerwarm("gc", "--grace", "0", cache_dir=fleet.cache_dir("a"))
        deadline = time.monotonic() + 30
        while staged.exists():  # gc skips it while the fetch still holds its lock
            assert time.monotonic() < deadline, f"gc never removed the staged blob: {p.stdout}"
            time.sleep(0.2)
            p = run_layerwarm("gc", "--grace", "0", cache_dir=fleet.cache_dir("a"))
    finally:
        for p in cpu:
            p.signal(signal.SIGCONT)
    status = fleet.wait_done(job_id, timeout=VISIBILITY_TIMEOUT)[job_id]
    [x] = status["layers"]
    assert x["state"] == "done", x
    assert (fleet.cache_dir("a") / cache_name(lay)).read_bytes() == lay.tar
    assert registry_proxy.count("GET", f"/blobs/{lay.digest}") >= 2


def test_a_registry_answering_500_forever_fails_the_layer_at_one_level(
    fleet: Fleet, registry: RegistryServer, registry_proxy: Proxy,
) -> None:
    lay = Layer(random_tar(5100, 500_000), "gzip")
    [ref] = push(registry, registry_proxy, [Image([lay])])
    registry_proxy.reset()
    registry_proxy.fail(f"/blobs/{lay.digest}", 500, times=None)
    try:
        code, out = submit(fleet, ref, "--to", "node:a")
    finally:
        registry_proxy.clear_rules()
    assert code == 1 and "HTTP 500" in out, out
    # The policy's 5 attempts, once: Celery does not retry it again (it was up to 175).
    assert registry_proxy.count("GET", f"/blobs/{lay.digest}") == 5
