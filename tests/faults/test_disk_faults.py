"""Faults on the local side: a crashed download resumed, a full disk, a decompression bomb.

Each asserts what a user would see: exit code, the one-line error, and that the cache
holds nothing wrong (no entry, no temp or staging file left behind).
"""

from __future__ import annotations

import gzip
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.cli import entries, leftovers, run_layerwarm
from tests.support.images import File, Image, Layer, make_tar, random_tar
from tests.support.mounts import tmpfs
from tests.support.proxy import Proxy
from tests.support.registry import RegistryServer


def _repo() -> str:
    return f"t/{uuid.uuid4().hex[:10]}"


def _name(lay: Layer) -> str:
    return "sha256_" + lay.digest.removeprefix("sha256:")


def test_partial_download_left_by_a_crash_is_resumed(
    registry: RegistryServer, registry_proxy: Proxy, cache_dir: Path
) -> None:
    lay = Layer(random_tar(100, 3_000_000), "none")  # incompressible: size ~ 3 MB
    r = _repo()
    registry.push_image(r, "1", Image([lay]))
    staging = cache_dir / ".staging"
    staging.mkdir(parents=True)
    kept = lay.size // 2
    (staging / (_name(lay) + ".partial")).write_bytes(lay.blob[:kept])

    p = run_layerwarm("warm", f"{registry_proxy.host}/{r}:1", cache_dir=cache_dir)
    assert p.returncode == 0, p.stderr
    assert f"resuming at byte {kept}" in p.stderr
    sent = [h.bytes_sent for h in registry_proxy.requests_log if lay.digest in h.path]
    assert sent == [lay.size - kept], "only the missing part crosses the network"
    assert (cache_dir / _name(lay)).read_bytes() == lay.tar
    assert leftovers(cache_dir) == []


def test_corrupt_partial_download_is_fetched_again(
    registry: RegistryServer, registry_proxy: Proxy, cache_dir: Path
) -> None:
    lay = Layer(random_tar(101, 1_000_000), "gzip")
    r = _repo()
    registry.push_image(r, "1", Image([lay]))
    staging = cache_dir / ".staging"
    staging.mkdir(parents=True)
    (staging / (_name(lay) + ".partial")).write_bytes(b"\0" * 1000)

    p = run_layerwarm("warm", f"{registry_proxy.host}/{r}:1", cache_dir=cache_dir)
    assert p.returncode == 0, p.stderr
    assert "did not verify; starting over" in p.stderr
    assert (cache_dir / _name(lay)).read_bytes() == lay.tar


def test_entry_without_a_row_is_hashed_before_it_is_adopted(
    registry: RegistryServer, registry_proxy: Proxy, cache_dir: Path
) -> None:
    good, bad = Layer(random_tar(102, 200_000), "gzip"), Layer(random_tar(103, 200_000), "zstd")
    r = _repo()
    registry.push_image(r, "1", Image([good, bad]))
    cache_dir.mkdir(parents=True, exist_ok=True)
    (cache_dir / _name(good)).write_bytes(good.tar)  # right content, no .meta.db row
    (cache_dir / _name(bad)).write_bytes(bytes(len(bad.tar)))  # right size, wrong bytes

    p = run_layerwarm("warm", f"{registry_proxy.host}/{r}:1", cache_dir=cache_dir)
    assert p.returncode == 0, p.stderr
    assert "does not match" in p.stderr or "fetching it again" in p.stderr, p.stderr
    assert registry_proxy.count(None, f"/blobs/{good.digest}") == 0, \
        "the good entry was adopted, not fetched"
    assert registry_proxy.count(None, f"/blobs/{bad.digest}") >= 1, \
        "the wrong entry was fetched again"
    assert (cache_dir / _name(good)).read_bytes() == good.tar
    assert (cache_dir / _name(bad)).read_bytes() == bad.tar


def test_staged_blob_is_hashed_before_it_is_reused(
    registry: RegistryServer, registry_proxy: Proxy, cache_dir: Path
) -> None:
    good, bad = Layer(random_tar(104, 200_000), "gzip"), Layer(random_tar(105, 200_000), "gzip")
    r = _repo()
    registry.push_image(r, "1", Image([good, bad]))
    staging = cache_dir / ".staging"
    staging.mkdir(parents=True)
    # Left by a run whose decompress never ran; staging files are not fsynced, so after a
    # power cut one can have the right size and the wrong bytes.
    (staging / _name(good)).write_bytes(good.blob)
    (staging / _name(bad)).write_bytes(bytes(bad.size))

    p = run_layerwarm("warm", f"{registry_proxy.host}/{r}:1", cache_dir=cache_dir)
    assert p.returncode == 0, p.stderr
    assert "does not verify: fetching it again" in p.stderr
    assert registry_proxy.count("GET", f"/blobs/{good.digest}") == 0, "good staged blob refetched"
    assert registry_proxy.count("GET", f"/blobs/{bad.digest}") == 1
    for lay in (good, bad):
        assert (cache_dir / _name(lay)).read_bytes() == lay.tar
    assert leftovers(cache_dir) == []


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs: a real ENOSPC, not a simulated one."""
    with tmpfs(tmp_path / "small", "size=4m", "the ENOSPC test") as mnt:
        yield mnt


def test_disk_full_fails_that_layer_cleanly(registry: RegistryServer, small_fs: Path) -> None:
    small = Layer(random_tar(102, 200_000), "gzip")
    big = Layer(random_tar(103, 8_000_000), "zstd")  # 8 MB of tar cannot fit in 4 MiB
    r = _repo()
    registry.push_image(r, "1", Image([small, big]))
    cache_dir = small_fs / "cache"

    p = run_layerwarm("warm", "--io-threads", "1", f"{registry.host}/{r}:1", cache_dir=cache_dir)
    assert p.returncode == 1
    assert f"error: layer {big.digest}: no space left on {cache_dir}" in p.stderr
    assert entries(cache_dir) == {_name(small)}
    assert (cache_dir / _name(small)).read_bytes() == small.tar
    assert leftovers(cache_dir) == [], "temp and staging files of the failed layer removed"


def _zeros_layer(size: int) -> Layer:
    return Layer(make_tar([File("zeros.bin", b"\0" * size)]), "gzip")


def test_decompression_bomb_is_stopped_by_the_ratio_cap(
    registry: RegistryServer, cache_dir: Path
) -> None:
    bomb = _zeros_layer(20_000_000)
    assert len(bomb.blob) * 500 < len(bomb.tar), "the fixture must really be a bomb"
    r = _repo()
    registry.push_image(r, "1", Image([bomb]))
    p = run_layerwarm(
        "warm", f"{registry.host}/{r}:1", cache_dir=cache_dir,
        env={"LAYERWARM_MAX_RATIO": "100", "LAYERWARM_RATIO_FLOOR": "1048576"},
    )
    assert p.returncode == 1
    assert "expands more than 100:1" in p.stderr and "decompression bomb" in p.stderr
    assert entries(cache_dir) == set() and leftovers(cache_dir) == []


def test_absolute_size_cap(registry: RegistryServer, cache_dir: Path) -> None:
    lay = Layer(random_tar(104, 3_000_000), "gzip")
    r = _repo()
    registry.push_image(r, "1", Image([lay]))
    p = run_layerwarm(
        "warm", f"{registry.host}/{r}:1", cache_dir=cache_dir,
        env={"LAYERWARM_MAX_LAYER_BYTES": "1000000"},
    )
    assert p.returncode == 1
    assert "decompresses to more than 1000000 bytes" in p.stderr
    assert entries(cache_dir) == set() and leftovers(cache_dir) == []


def test_default_caps_let_an_honest_compressible_layer_through(
    registry: RegistryServer, cache_dir: Path
) -> None:
    lay = _zeros_layer(5_000_000)  # very compressible, but under the ratio floor
    r = _repo()
    registry.push_image(r, "1", Image([lay]))
    p = run_layerwarm("warm", f"{registry.host}/{r}:1", cache_dir=cache_dir)
    assert p.returncode == 0, p.stderr
    assert (cache_dir / _name(lay)).read_bytes() == lay.tar
    assert gzip.decompress(lay.blob) == lay.tar
