"""Faults between layerwarm and the registry: random 5xx, cut connections, Retry-After, an
outage. Each runs the real `layerwarm warm` (and, where it is cheap, a real two-worker
fleet through `submit --wait`) against the real registry behind the fault proxy.

Every test checks what a user relies on: the exit code or the job's final state, and
every `sha256_*` file in every cache directory and every S3 object equals its layer's
tar, byte for byte. The proxy's request log (`Hit.at`, `Hit.bytes_sent`, `Hit.status`)
shows how the client retried.
"""

from __future__ import annotations

import email.utils
import json
import subprocess
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.support.cli import entries, leftovers, run_layerwarm
from tests.support.faults import Known, RedisServer, cache_name, s3_objects
from tests.support.fleet import Fleet, FleetError
from tests.support.images import Image, Layer, random_tar
from tests.support.procs import ServiceError
from tests.support.proxy import Hit, Proxy
from tests.support.registry import RegistryServer
from tests.support.s3 import S3Server

PREFIX = "layers"
# What a client may lose of a cut response: the part of its last read (the pipeline reads
# blobs 1 MiB at a time) that had arrived when the connection dropped.
READ_CHUNK = 1 << 20
KNOWN = Known()


def repo() -> str:
    return f"t/{uuid.uuid4().hex[:10]}"


def layer(seed: int, compression: str = "gzip", size: int = 100_000) -> Layer:
    return KNOWN.add(Layer(random_tar(seed, size), compression))


def push(registry: RegistryServer, proxy: Proxy, images: Sequence[Image],
         name: str | None = None) -> list[str]:
    """Push each image to a repo of its own; ``name`` makes the repo names (hence the
    request paths, hence fail_ratio's decisions) the same on every run."""
    refs = []
    for i, img in enumerate(images):
        r = f"t/{name}-{i}" if name else repo()
        registry.push_image(r, "1", img)
        refs.append(f"{proxy.host}/{r}:1")
    return refs


def unique(layers: Sequence[Layer]) -> list[Layer]:
    return list({lay.digest: lay for lay in layers}.values())


def many_images(seed: int, count: int) -> tuple[list[Image], list[Layer]]:
    """``count`` images over 2 shared bases and 3 middles, each with a layer of its own."""
    bases = [layer(seed, "gzip", 300_000), layer(seed + 1, "zstd", 250_000)]
    mids = [layer(seed + 2 + i, c, 120_000) for i, c in enumerate(("zstd", "gzip", "none"))]
    images = []
    for i in range(count):
        own = layer(seed + 10 + i, ("gzip", "zstd", "none")[i % 3], 50_000)
        images.append(Image([bases[i % 2], mids[i % 3], own], format="docker" if i % 4 else "oci"))
    return images, unique([lay for img in images for lay in img.layers])


def blob_hits(proxy: Proxy, lay: Layer) -> list[Hit]:
    return [h for h in proxy.requests_log if h.method == "GET" and lay.digest in h.path]


def assert_disk(cache_dir: Path, layers: Sequence[Layer]) -> None:
    problems = KNOWN.check_dir(str(cache_dir), cache_dir)
    assert problems == [], problems
    missing = [cache_name(x) for x in layers if cache_name(x) not in entries(cache_dir)]
    assert missing == [], f"not cached: {missing}"
    assert leftovers(cache_dir) == [], "temp or staging files left behind"


def warm(refs: Sequence[str], cache_dir: Path, timeout: float = 180,
         **env: str) -> subprocess.CompletedProcess[str]:
    return run_layerwarm("warm", *refs, cache_dir=cache_dir, env=env, timeout=timeout)


# ---------------------------------------------------------------- a two-worker fleet


@pytest.fixture(scope="module")
def fleet(
    tmp_path_factory: pytest.TempPathFactory, s3: S3Server
) -> Iterator[tuple[Fleet, str]]:
    """Nodes a and b on a private Redis, S3 (moto) as the shared tier; (fleet, bucket)."""
    root = tmp_path_factory.mktemp("transfer-fleet")
    try:
        redis_server = RedisServer(root / "redis").start()
    except ServiceError as exc:
        pytest.fail(str(exc), pytrace=False)
    bucket = s3.create_bucket(f"transfer-{uuid.uuid4().hex[:8]}")
    f = Fleet(root, ("a", "b"), redis_server.url(0), f"s3://{bucket}/{PREFIX}", s3.env(),
              visibility_timeout=60, lease_ttl=10)
    try:
        f.start()
    except FleetError as exc:
        redis_server.stop()
        pytest.fail(f"the layerwarm worker fleet did not start: {exc}", pytrace=False)
    yield f, bucket
    f.stop()
    redis_server.stop()


def submit_wait(f: Fleet, *args: str) -> dict[str, Any]:
    """`submit ARGS --wait --json`: must exit 0 with a done job; returns the status."""
    p = f.submit(*args, "--wait", "--json", timeout=240)
    try:
        status = json.loads(p.stdout)
    except ValueError:
        pytest.fail(f"submit --wait --json printed no JSON (exit {p.returncode}): "
                    f"{p.stdout[:2000]!r}\nstderr: {p.stderr[-3000:]}\n{f.logs()}")
    detail = f"{json.dumps(status, indent=1)[:4000]}\nstderr: {p.stderr[-3000:]}\n{f.logs()}"
    assert status["state"] == "done", detail
    assert p.returncode == 0, detail
    assert status["image_failures"] == [], detail
    assert all(x["state"] == "done" and x["reason"] is None for x in status["layers"]), detail
    return status


def assert_fleet(f: Fleet, s3: S3Server, bucket: str, layers: Sequence[Layer],
                 status: dict[str, Any]) -> None:
    """The job covered exactly ``layers``; each is in S3; every entry anywhere is whole."""
    assert {x["digest"] for x in status["layers"]} == {lay.digest for lay in layers}
    stored = s3_objects(s3.client(), bucket, PREFIX)
    problems = KNOWN.check_objects("S3", stored)
    for name, node in f.nodes.items():
        problems += KNOWN.check_dir(f"node {name}", node.cache_dir)
    assert problems == [], problems
    missing = [cache_name(x) for x in layers if cache_name(x) not in stored]
    assert missing == [], f"not in S3: {missing}"


# ---------------------------------------------------------------- 1. random 500/503


def failed_share(hits: Sequence[Hit]) -> float:
    return sum(1 for h in hits if h.status in (500, 503)) / max(len(hits), 1)


# Every request the client sends is retried 4 times (5 attempts); a path is never refused
# more than 3 times in a row here, so the run must succeed whatever the thread interleaving:
# this tests that every request is retried, not the odds of 5 failures in a row.
MAX_STREAK = 3


def test_warm_survives_30_percent_5xx(
    registry: RegistryServer, registry_proxy: Proxy, cache_dir: Path
) -> None:
    images, layers = many_images(2000, 9)
    refs = push(registry, registry_proxy, images, name="ratio-warm")
    registry_proxy.reset()
    registry_proxy.fail_ratio(r"^/v2/.", (500, 503), 0.3, seed=11, max_streak=MAX_STREAK)

    p = warm(refs, cache_dir)
    assert p.returncode == 0, p.stderr[-4000:]
    assert_disk(cache_dir, layers)
    share = failed_share(registry_proxy.requests_log)
    assert share >= 0.15, f"the proxy refused only {share:.0%} of requests: nothing tested"
    for lay in layers:
        ok = [h for h in blob_hits(registry_proxy, lay) if h.status in (200, 206)]
        assert sum(h.bytes_sent for h in ok) == lay.size, f"{lay.digest}: fetched more than once"


def test_fleet_survives_30_percent_5xx(
    fleet: tuple[Fleet, str], registry: RegistryServer, registry_proxy: Proxy, s3: S3Server,
    tmp_path: Path,
) -> None:
    f, bucket = fleet
    images, layers = many_images(2100, 8)
    refs = push(registry, registry_proxy, images, name="ratio-fleet")
    file = tmp_path / "fleet.txt"
    file.write_text("\n".join(refs) + "\n")
    registry_proxy.reset()
    registry_proxy.fail_ratio(r"^/v2/.", (500, 503), 0.3, seed=12, max_streak=MAX_STREAK)

    status = submit_wait(f, "-f", str(file), "--to", "remote")
    assert_fleet(f, s3, bucket, layers, status)
    share = failed_share(registry_proxy.requests_log)
    assert share >= 0.15, f"the proxy refused only {share:.0%} of requests: nothing tested"


# ---------------------------------------------------------------- 2. connection resets


def big_layers(seed: int) -> list[Layer]:
    # A few MB each; "none" and a random-heavy tar keep gzip/zstd blobs MB-sized too.
    return [layer(seed, "none", 4_000_000), layer(seed + 1, "gzip", 5_000_000),
            layer(seed + 2, "zstd", 5_000_000)]


def cut_every_blob(proxy: Proxy, layers: Sequence[Layer]) -> dict[str, int]:
    cuts = {}
    for lay in layers:
        cuts[lay.digest] = lay.size // 3
        proxy.reset_after(f"/blobs/{lay.digest}", cuts[lay.digest], times=1, method="GET")
    return cuts


def assert_resumed(proxy: Proxy, layers: Sequence[Layer], cuts: dict[str, int]) -> None:
    for lay in layers:
        hits = blob_hits(proxy, lay)
        summary = [(h.status, h.bytes_sent) for h in hits]
        assert len(hits) == 2, f"{lay.digest} ({lay.size} bytes): want cut + resumed, got {summary}"
        cut, resumed = hits
        assert (cut.status, cut.bytes_sent) == (200, cuts[lay.digest]), summary
        assert resumed.status == 206, f"{lay.digest}: the retry did not ask for a Range: {summary}"
        total = cut.bytes_sent + resumed.bytes_sent
        assert lay.size <= total <= lay.size + READ_CHUNK, (
            f"{lay.digest}: {total} bytes sent for a {lay.size}-byte blob cut once: {summary}"
        )


def test_warm_resumes_cut_blobs_with_range(
    registry: RegistryServer, registry_proxy: Proxy, cache_dir: Path
) -> None:
    layers = big_layers(2200)
    refs = push(registry, registry_proxy, [Image(layers[:2]), Image(layers[2:])])
    registry_proxy.reset()
    cuts = cut_every_blob(registry_proxy, layers)

    p = warm(refs, cache_dir)
    assert p.returncode == 0, p.stderr[-4000:]
    assert_disk(cache_dir, layers)
    assert_resumed(registry_proxy, layers, cuts)


def test_fleet_resumes_cut_blobs_with_range(
    fleet: tuple[Fleet, str], registry: RegistryServer, registry_proxy: Proxy, s3: S3Server
) -> None:
    f, bucket = fleet
    layers = big_layers(2300)
    refs = push(registry, registry_proxy, [Image(layers[:2]), Image(layers[2:])])
    registry_proxy.reset()
    cuts = cut_every_blob(registry_proxy, layers)

    status = submit_wait(f, *refs, "--to", "remote")
    assert_fleet(f, s3, bucket, layers, status)
    assert_resumed(registry_proxy, layers, cuts)


# ---------------------------------------------------------------- 3. Retry-After


def refused_then_next(proxy: Proxy, lay: Layer) -> tuple[Hit, Hit]:
    hits = blob_hits(proxy, lay)
    statuses = [h.status for h in hits]
    assert statuses[:1] == [503] and len(hits) >= 2, f"{lay.digest}: {statuses}"
    return hits[0], hits[1]


@pytest.mark.parametrize("form", ["delta-seconds", "http-date"])
def test_warm_honours_retry_after(
    form: str, registry: RegistryServer, registry_proxy: Proxy, cache_dir: Path
) -> None:
    lay = layer(2400 + len(form), "gzip", 200_000)
    other = layer(2410 + len(form), "zstd", 80_000)
    refs = push(registry, registry_proxy, [Image([other, lay])])
    registry_proxy.reset()
    if form == "delta-seconds":
        value, not_before = "2", None
    else:
        # A whole second a few seconds ahead, so the header says exactly that instant.
        when = int(time.time()) + 4
        value = email.utils.formatdate(when, usegmt=True)
        not_before = time.monotonic() + (when - time.time())
    registry_proxy.fail(f"/blobs/{lay.digest}", 503, times=1, headers={"Retry-After": value})

    started = time.monotonic()
    p = warm(refs, cache_dir)
    assert p.returncode == 0, p.stderr[-4000:]
    assert time.monotonic() - started < 60
    assert_disk(cache_dir, [lay, other])
    refused, following = refused_then_next(registry_proxy, lay)
    gap = following.at - refused.at
    if not_before is None:
        assert gap >= 2.0, f"asked again {gap:.2f}s after 'Retry-After: 2'"
    else:
        early = not_before - following.at
        assert early <= 0.05, f"asked again {early:.2f}s before 'Retry-After: {value}'"


def test_fleet_honours_retry_after(
    fleet: tuple[Fleet, str], registry: RegistryServer, registry_proxy: Proxy, s3: S3Server
) -> None:
    f, bucket = fleet
    lay = layer(2500, "gzip", 200_000)
    refs = push(registry, registry_proxy, [Image([lay])])
    registry_proxy.reset()
    registry_proxy.fail(f"/blobs/{lay.digest}", 503, times=1, headers={"Retry-After": "2"})

    status = submit_wait(f, *refs, "--to", "remote")
    assert_fleet(f, s3, bucket, [lay], status)
    refused, following = refused_then_next(registry_proxy, lay)
    assert following.at - refused.at >= 2.0, f"{following.at - refused.at:.2f}s"


# ---------------------------------------------------------------- 4. registry outage

# The registry client tries each request 5 times (4 retries) with backoff of
# min(8, 0.5 * 2**n) * U(0.5, 1): at least 0.25+0.5+1+2 = 3.75 s and at most 7.5 s of
# waiting. An outage shorter than 3.75 s as seen by the client is always ridden out; a
# longer one may fail the run, which must then end soon with a clear, transient error
# naming the registry.
RETRY_BUDGET_MIN, RETRY_BUDGET_MAX = 3.75, 7.5


def test_warm_rides_out_a_short_registry_outage(
    registry: RegistryServer, registry_proxy: Proxy, cache_dir: Path
) -> None:
    images, layers = many_images(2600, 3)
    refs = push(registry, registry_proxy, images)
    registry_proxy.reset()
    registry_proxy.fail_for(r"^/v2/", 3.0, 503)  # from now: warm starts inside the outage

    p = warm(refs, cache_dir)
    assert p.returncode == 0, p.stderr[-4000:]
    assert_disk(cache_dir, layers)
    hits = registry_proxy.requests_log
    refused = [h for h in hits if h.status == 503]
    assert refused, "warm started after the outage was over: nothing tested"
    first_ok = min(h.at for h in hits if h.status in (200, 206))
    assert first_ok >= refused[0].at + 1.0, "the run did not wait out the outage"


def test_warm_fails_clearly_when_the_outage_outlasts_the_retries(
    registry: RegistryServer, registry_proxy: Proxy, cache_dir: Path
) -> None:
    lay = layer(2700, "gzip", 60_000)
    refs = push(registry, registry_proxy, [Image([lay])])
    registry_proxy.reset()
    registry_proxy.fail_for(r"^/v2/", 120.0, 503)

    started = time.monotonic()
    p = warm(refs, cache_dir)
    took = time.monotonic() - started
    assert p.returncode == 1, (p.returncode, p.stderr[-3000:])
    assert took < RETRY_BUDGET_MAX + 20, f"gave up only after {took:.0f}s"
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    errors = [x for x in p.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1, p.stderr[-3000:]
    assert registry_proxy.host in errors[0] and "503" in errors[0], errors[0]
    manifests = [h for h in registry_proxy.requests_log if "/manifests/" in h.path]
    assert 2 <= len(manifests) <= 5, f"{len(manifests)} manifest requests: want 1 + up to 4 retries"
    assert manifests[-1].at - manifests[0].at >= RETRY_BUDGET_MIN * 0.9, "retried without backoff"
    assert entries(cache_dir) == set()
