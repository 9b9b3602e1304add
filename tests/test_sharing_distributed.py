"""Sharing by diff_id in distributed mode: a real `layerwarm worker` links a layer whose
content it already holds under another digest, for a node target and for the shared tier,
instead of fetching it (counted at the registry proxy), and publishes the linked entry."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.fleet import Fleet, FleetError, broker_url_for
from tests.support.images import Image, Layer, random_tar
from tests.support.proxy import Proxy
from tests.support.registry import RegistryServer

SHARING_DB = 11  # this module's fleet's Redis database (flushed at start)


def _name(lay: Layer) -> str:
    return "sha256_" + lay.digest.removeprefix("sha256:")


@pytest.fixture(scope="module")
def shared_tier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("shared-tier")


@pytest.fixture(scope="module")
def fleet(
    tmp_path_factory: pytest.TempPathFactory, redis_url: str, shared_tier: Path
) -> Iterator[Fleet]:
    """One node with a directory remote tier: sharing is a matter of one node's disk."""
    f = Fleet(
        tmp_path_factory.mktemp("fleet"),
        ("a",),
        broker_url_for(redis_url, SHARING_DB),
        shared_tier.as_uri(),
    )
    try:
        f.start()
    except FleetError as exc:
        pytest.fail(f"the layerwarm worker fleet did not start: {exc}", pytrace=False)
    yield f
    f.stop()


def _submit(fleet: Fleet, *args: str) -> dict[str, Any]:
    p = fleet.submit(*args, "--wait", "--json")
    assert p.returncode == 0, f"{p.stdout[-2000:]}\n{p.stderr[-3000:]}\n{fleet.logs()}"
    return json.loads(p.stdout)


def test_a_worker_links_instead_of_fetching(
    fleet: Fleet, registry: RegistryServer, registry_proxy: Proxy, shared_tier: Path
) -> None:
    tars = [random_tar(800, 200_000), random_tar(801, 150_000)]
    gz = [Layer(t, "gzip") for t in tars]
    zs = [Layer(t, "zstd") for t in tars]
    repo = f"share/{uuid.uuid4().hex[:10]}"
    registry.push_image(repo, "gzip", Image(gz))
    registry.push_image(repo, "zstd0", Image([zs[0]]))
    registry.push_image(repo, "zstd1", Image([zs[1]]))
    ref = f"{registry_proxy.host}/{repo}"
    disk = fleet.cache_dir("a")

    status = _submit(fleet, f"{ref}:gzip", "--to", "node:a")
    assert {x["tier"] for x in status["layers"]} == {"registry"}

    # A node target: the fetch task finds the diff_id on the node's disk and links it.
    registry_proxy.reset()
    status = _submit(fleet, f"{ref}:zstd0", "--to", "node:a")
    [x] = status["layers"]
    assert (x["digest"], x["state"], x["tier"]) == (zs[0].digest, "done", "link"), x
    assert x["shared_from"] == gz[0].digest and x["host"] in ("a", "io@a"), x
    a, b = disk / _name(gz[0]), disk / _name(zs[0])
    assert a.stat().st_ino == b.stat().st_ino and b.stat().st_nlink == 2
    assert b.read_bytes() == tars[0]
    assert registry_proxy.count("GET", f"/blobs/{zs[0].digest}") == 0, "the worker fetched it"
    assert not (shared_tier / _name(zs[0])).exists(), "a linked entry was published"
    # The status table says so in words.
    p = fleet.run("status", status["id"], timeout=60)
    assert p.returncode == 0 and "disk (shared by diff_id)" in p.stdout, p.stdout

    # The same layer for the shared tier: the link is no proof of the zstd blob, so it is
    # fetched, its verified entry replaces the link, and that is what gets published.
    status = _submit(fleet, f"{ref}:zstd0", "--to", "remote")
    [x] = status["layers"]
    assert (x["state"], x["tier"]) == ("done", "registry"), x
    assert registry_proxy.count("GET", f"/blobs/{zs[0].digest}") == 1
    assert (shared_tier / _name(zs[0])).read_bytes() == tars[0]
    assert b.read_bytes() == tars[0] and a.read_bytes() == tars[0]

    # A remote target: the shared tier gets only what a verified blob proved, so the
    # zstd blob is fetched (the config's diff_id is no proof), and then published.
    status = _submit(fleet, f"{ref}:zstd1", "--to", "remote")
    [x] = status["layers"]
    assert (x["digest"], x["state"], x["tier"]) == (zs[1].digest, "done", "registry"), x
    assert registry_proxy.count("GET", f"/blobs/{zs[1].digest}") == 1
    assert (shared_tier / _name(zs[1])).read_bytes() == tars[1]
