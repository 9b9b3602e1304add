"""The chain's gates, embedded: what only a blob's digest can catch names nothing; a config
cannot pair a digest with content it never proved; retries end.

Each test here is one a user would run: `layerwarm warm` against a real registry behind
the fault proxy, a `file://` remote tier, then what is on disk, in `.meta.db` and in the
remote tier. The fleet's side of the same gates is in test_chain_gates_fleet.py.
"""

from __future__ import annotations

import sqlite3
import struct
import subprocess
import time
import uuid
from functools import cached_property
from pathlib import Path

import pytest

from pipeline.digest import Digest
from pipeline.errors import TransientError
from pipeline.tiers.directory import DirectoryTier
from tests.support.cli import entries, layerwarm_cmd, layerwarm_env, leftovers, run_layerwarm
from tests.support.images import Image, Layer, random_tar
from tests.support.proxy import Proxy
from tests.support.registry import RegistryServer

TRAILER = 2 << 20  # bytes after the compressed stream
HELD = 1 << 20     # of which the proxy holds back the last this many


class TrailingLayer(Layer):
    """A layer whose blob carries bytes after its compressed stream, as some do: zero
    padding after the last gzip member (`gzip -d` ignores it), a zstd skippable frame."""

    @cached_property
    def blob(self) -> bytes:  # type: ignore[override]
        stream = super().blob
        if self.compression == "zstd":  # magic 0x184D2A50, then the frame's length
            return stream + struct.pack("<II", 0x184D2A50, TRAILER) + bytes(TRAILER)
        return stream + bytes(TRAILER)


def cache_name(lay: Layer) -> str:
    return "sha256_" + lay.digest.removeprefix("sha256:")


def rows(cache_dir: Path) -> list[str]:
    db = cache_dir / ".meta.db"
    if not db.exists():
        return []
    with sqlite3.connect(db) as conn:
        return [r[0] for r in conn.execute("SELECT digest FROM layers")]


def push(registry: RegistryServer, proxy: Proxy, *images: Image) -> list[str]:
    repo = f"gates/{uuid.uuid4().hex[:10]}"
    for i, img in enumerate(images):
        registry.push_image(repo, f"t{i}", img)
    return [f"{proxy.host}/{repo}:t{i}" for i in range(len(images))]


def wait_for_output(cache_dir: Path, lay: Layer, timeout: float = 60) -> None:
    """Until the entry being written in `.tmp/` holds the whole tar (or, were the gate
    missing, the entry was named already)."""
    deadline = time.monotonic() + timeout
    size = len(lay.tar)
    while time.monotonic() < deadline:
        if (cache_dir / cache_name(lay)).exists():
            return
        for p in (cache_dir / ".tmp").glob("*"):
            try:
                if p.stat().st_size >= size:
                    return
            except FileNotFoundError:
                continue
        time.sleep(0.02)
    raise AssertionError(f"no file in {cache_dir}/.tmp reached {size} bytes in {timeout:.0f}s")


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_a_corrupt_byte_after_the_stream_names_no_entry(
    registry: RegistryServer, registry_proxy: Proxy, cache_dir: Path, tmp_path: Path,
    compression: str,
) -> None:
    """The decoder is done long before the download; the flipped byte is in the trailer."""
    lay = TrailingLayer(random_tar(4100, 300_000), compression)
    [ref] = push(registry, registry_proxy, Image([lay]))
    registry_proxy.flip_byte(f"/blobs/{lay.digest}", lay.size - 1)
    hold = registry_proxy.hold(f"/blobs/{lay.digest}", HELD)
    shared = tmp_path / "shared"
    env = {"LAYERWARM_REMOTE": shared.as_uri(), "LAYERWARM_RETRY_ATTEMPTS": "1"}

    warm = subprocess.Popen(layerwarm_cmd("warm", ref), env=layerwarm_env(cache_dir, env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        hold.wait(timeout=60)
        if compression == "gzip":
            # The whole tar is inflated into the entry's temp file: all that is left to
            # arrive is the trailer's held end, which holds the corrupt byte. (zstd's
            # reader asks for more input before it hands out a frame's last output.)
            wait_for_output(cache_dir, lay)
        hold.release()
        out, err = warm.communicate(timeout=120)
    finally:
        hold.release()
        if warm.poll() is None:
            warm.kill()
    assert warm.returncode == 1, (out, err)
    assert "digest mismatch" in err and lay.digest in err, err
    assert "Traceback" not in err, err
    assert cache_name(lay) not in entries(cache_dir)
    assert rows(cache_dir) == []
    assert not (shared / cache_name(lay)).exists()
    assert leftovers(cache_dir) == []

    # And a warm that gets the blob whole names the entry, bytes and all.
    registry_proxy.clear_rules()
    p = run_layerwarm("warm", ref, cache_dir=cache_dir, env=env)
    assert p.returncode == 0, p.stderr
    assert (cache_dir / cache_name(lay)).read_bytes() == lay.tar


def test_sharing_cannot_poison_another_image(
    registry: RegistryServer, registry_proxy: Proxy, cache_dir: Path, tmp_path: Path,
) -> None:
    """Image B claims the victim's layer digest has the attacker's diff_id. Warming B may
    link the attacker's tar under that digest for B, but never publishes it, and a warm
    of the real image gets the real tar, not a "disk hit"."""
    attacker = Layer(random_tar(4200, 200_000), "gzip")
    victim = Layer(random_tar(4201, 200_000), "gzip")
    liar = Layer(victim.tar, "gzip", override_diff_id=attacker.diff_id)
    assert liar.digest == victim.digest
    ref_a, ref_b, ref_v = push(registry, registry_proxy,
                               Image([attacker]), Image([liar]), Image([victim]))
    shared = tmp_path / "shared"
    env = {"LAYERWARM_REMOTE": shared.as_uri()}

    for ref in (ref_a, ref_b):
        p = run_layerwarm("warm", ref, cache_dir=cache_dir, env=env)
        assert p.returncode == 0, p.stderr
    assert not (shared / cache_name(victim)).exists(), "a linked entry was published"

    p = run_layerwarm("warm", ref_v, cache_dir=cache_dir, env=env)
    assert p.returncode == 0, p.stderr
    assert (cache_dir / cache_name(victim)).read_bytes() == victim.tar
    assert (shared / cache_name(victim)).read_bytes() == victim.tar
    assert (cache_dir / cache_name(attacker)).read_bytes() == attacker.tar


def test_a_poisoned_remote_object_is_a_miss_and_is_replaced(
    registry: RegistryServer, registry_proxy: Proxy, cache_dir: Path, tmp_path: Path,
) -> None:
    """An object in the remote tier whose metadata names another diff_id (as older
    versions could publish) is not a hit: the layer is fetched and the object replaced."""
    attacker = Layer(random_tar(4300, 150_000), "gzip")
    victim = Layer(random_tar(4301, 150_000), "gzip")
    [ref_v] = push(registry, registry_proxy, Image([victim]))
    shared = tmp_path / "shared"
    planted = tmp_path / "attacker.tar"
    planted.write_bytes(attacker.tar)
    DirectoryTier(shared).upload(Digest.parse(victim.digest), planted, {
        "diff-id": attacker.diff_id, "media-type": victim.media_type,
        "compressed-size": str(victim.size), "uncompressed-size": str(len(attacker.tar))})

    p = run_layerwarm("warm", ref_v, "--json", cache_dir=cache_dir,
                      env={"LAYERWARM_REMOTE": shared.as_uri()})
    assert p.returncode == 0, p.stderr
    assert '"source": "registry"' in p.stdout, p.stdout
    assert (cache_dir / cache_name(victim)).read_bytes() == victim.tar
    assert (shared / cache_name(victim)).read_bytes() == victim.tar


def test_a_registry_answering_500_forever_fails_the_layer_after_the_policy(
    registry: RegistryServer, registry_proxy: Proxy, cache_dir: Path,
) -> None:
    lay = Layer(random_tar(4400, 80_000), "gzip")
    [ref] = push(registry, registry_proxy, Image([lay]))
    registry_proxy.reset()
    registry_proxy.fail(f"/blobs/{lay.digest}", 500, times=None)

    p = run_layerwarm("warm", ref, cache_dir=cache_dir)
    assert p.returncode == 1, p.stderr
    assert "HTTP 500" in p.stderr and "Traceback" not in p.stderr, p.stderr
    # One level of retries: the policy's 5 attempts, not 5 x 5 x 7 as before.
    assert registry_proxy.count("GET", f"/blobs/{lay.digest}") == 5
    assert entries(cache_dir) == set() and leftovers(cache_dir) == []


@pytest.mark.parametrize("status", [503, 429])
def test_an_endless_retry_after_fails_at_once_instead_of_hanging(
    registry: RegistryServer, registry_proxy: Proxy, cache_dir: Path, status: int,
) -> None:
    """`Retry-After: 999999` is not waited out with the layer's lock held: the layer
    fails with a message that says why, and the next warm gets it."""
    lay = Layer(random_tar(4500 + status, 80_000), "gzip")
    [ref] = push(registry, registry_proxy, Image([lay]))
    registry_proxy.fail(f"/blobs/{lay.digest}", status, times=1,
                        headers={"Retry-After": "999999"})

    p = run_layerwarm("warm", ref, cache_dir=cache_dir, timeout=60)
    assert p.returncode == 1, p.stderr
    assert f"HTTP {status}" in p.stderr and "LAYERWARM_MAX_RETRY_AFTER=60" in p.stderr, p.stderr
    assert entries(cache_dir) == set()
    p = run_layerwarm("warm", ref, cache_dir=cache_dir, timeout=60)
    assert p.returncode == 0, p.stderr
    assert (cache_dir / cache_name(lay)).read_bytes() == lay.tar


def test_a_429_pauses_the_fleet_for_no_longer_than_the_cap(
    registry: RegistryServer, registry_proxy: Proxy, redis_url: str,
) -> None:
    """The pause a 429 puts on a registry host for every worker (kept in Redis) is capped
    like any wait: 999999 s would have stopped a fleet's pulls from that host for 11 days."""
    import redis

    from pipeline.reference import Reference
    from pipeline.registry import DockerConfig, RegistryClient
    from pipeline.retry import RetryPolicy
    from workers.ratelimit import RedisRateLimiter

    lay = Layer(random_tar(4600, 20_000), "gzip")
    [ref] = push(registry, registry_proxy, Image([lay]))
    registry_proxy.fail(r"/manifests/", 429, times=1, headers={"Retry-After": "999999"})
    client = redis.Redis.from_url(redis_url)
    limiter = RedisRateLimiter(client, 1000)
    pause_key = f"layerwarm:rate:{registry_proxy.host.lower()}:pause"
    client.delete(pause_key)
    registry_client = RegistryClient(docker_config=DockerConfig(), rate_limiter=limiter,
                                     retry=RetryPolicy(max_retry_after=5))
    with pytest.raises(TransientError, match="LAYERWARM_MAX_RETRY_AFTER=5"):
        registry_client.fetch_manifest(Reference.parse(ref))
    assert 0 < client.pttl(pause_key) <= 5000
    client.delete(pause_key)
