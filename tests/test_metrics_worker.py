"""`layerwarm worker --metrics-port`: a real worker host serves its cache's metrics over HTTP
while real jobs run on it; each scrape is parsed with prometheus_client's parser and
checked against where the job's layers came from (registry, disk, the remote tier)."""

from __future__ import annotations

import json
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.support.cli import run_layerwarm
from tests.support.fleet import Fleet, FleetError, broker_url_for
from tests.support.images import Image, Layer, random_tar
from tests.support.metrics import Scrape
from tests.support.procs import free_port
from tests.support.registry import RegistryServer

METRICS_DB = 10  # this module's Redis database (flushed when the fleet starts)
HIST = "layerwarm_layer_materialize_seconds"


@pytest.fixture
def node(tmp_path: Path, redis_url: str) -> Iterator[tuple[Fleet, str]]:
    """One worker host `m` with a shared directory as remote tier, serving its metrics."""
    port = free_port()
    fleet = Fleet(
        tmp_path / "fleet",
        ("m",),
        broker_url_for(redis_url, METRICS_DB),
        f"file://{tmp_path / 'shared'}",
        worker_args={"m": ["--metrics-port", str(port), "--metrics-address", "127.0.0.1"]},
    )
    try:
        fleet.start()
    except FleetError as exc:
        pytest.fail(f"the worker host did not start: {exc}", pytrace=False)
    yield fleet, f"http://127.0.0.1:{port}/metrics"
    fleet.stop()


def _scrape(url: str) -> Scrape:
    r = requests.get(url, timeout=10)
    assert r.status_code == 200, r.text
    assert r.headers["Content-Type"].startswith("text/plain")
    return Scrape(r.text)


def _scrape_until(url: str, name: str, want: float, **labels: str) -> Scrape:
    """Scrape until a counter reaches `want` (work that ends after the job, like publish)."""
    deadline = time.monotonic() + 60
    while True:
        m = _scrape(url)
        if m(name, **labels) == want or time.monotonic() > deadline:
            return m
        time.sleep(0.3)


def _submit(fleet: Fleet, ref: str, to: str) -> None:
    p = fleet.submit(ref, "--to", to, "--wait")
    assert p.returncode == 0, f"{p.stdout}\n{p.stderr[-3000:]}\n{fleet.logs()}"


def test_worker_serves_hits_misses_and_bytes_of_its_jobs(
    node: tuple[Fleet, str], registry: RegistryServer
) -> None:
    fleet, url = node
    layers = [Layer(random_tar(950 + i, 150_000), c) for i, c in enumerate(("gzip", "zstd"))]
    repo = f"metrics/{uuid.uuid4().hex[:10]}"
    registry.push_image(repo, "1", Image(layers))
    ref = f"{registry.host}/{repo}:1"
    blobs, tars = sum(x.size for x in layers), sum(len(x.tar) for x in layers)

    m = _scrape(url)
    assert m("layerwarm_cache_entries") == 0 and m(f"{HIST}_count") == 0

    # 1. From the registry onto the node; the shared copy is published after the job ends.
    _submit(fleet, ref, "node:m")
    m = _scrape_until(url, "layerwarm_bytes_published_total", tars, tier="remote")
    assert m("layerwarm_bytes_published_total", tier="remote") == tars
    for tier in ("disk", "remote"):
        assert m("layerwarm_cache_misses_total", tier=tier) == 2
        assert m("layerwarm_cache_hits_total", tier=tier) == 0
    assert m("layerwarm_layers_materialized_total", source="registry") == 2
    assert m("layerwarm_bytes_fetched_total", source="registry") == blobs
    assert m("layerwarm_cache_entries") == 2 and m("layerwarm_cache_bytes") == tars
    assert m(f"{HIST}_count") == 2 and m.buckets(HIST)[-1][1] == 2

    # 2. Again: both on the node's disk.
    _submit(fleet, ref, "node:m")
    m = _scrape(url)
    assert m("layerwarm_cache_hits_total", tier="disk") == 2
    assert m("layerwarm_layers_materialized_total", source="disk") == 2

    # 3. Removed from the node's disk: restored from the remote tier, not the registry.
    p = run_layerwarm("rm", *(x.digest for x in layers), cache_dir=fleet.cache_dir("m"))
    assert p.returncode == 0, p.stderr
    _submit(fleet, ref, "node:m")
    m = _scrape(url)
    assert m("layerwarm_cache_misses_total", tier="disk") == 4
    assert m("layerwarm_cache_hits_total", tier="remote") == 2
    assert m("layerwarm_bytes_fetched_total", source="remote") == tars
    assert m("layerwarm_bytes_fetched_total", source="registry") == blobs, "fetched once"
    assert m(f"{HIST}_count") == 6

    # 4. To the shared tier: it is there already, a remote hit that moves no bytes.
    _submit(fleet, ref, "remote")
    m = _scrape(url)
    assert m("layerwarm_cache_hits_total", tier="remote") == 4
    assert m("layerwarm_bytes_fetched_total", source="remote") == tars

    # `df` of the node's cache reads the same counters.
    p = run_layerwarm("df", "--json", cache_dir=fleet.cache_dir("m"))
    assert p.returncode == 0, p.stderr
    h = json.loads(p.stdout)["hit_ratio"]
    assert (h["disk_hits"], h["disk_lookups"], h["cache_hits"], h["layers"]) == (2, 6, 6, 8)


def test_metrics_port_problems_are_one_line_before_any_worker_starts(
    tmp_path: Path, redis_url: str
) -> None:
    broker = broker_url_for(redis_url, METRICS_DB)
    p = run_layerwarm(
        "worker",
        "--node",
        "x",
        "--metrics-port",
        "70000",
        "--broker",
        broker,
        cache_dir=tmp_path / "cache",
        timeout=30,
    )
    assert p.returncode == 2 and "not a TCP port: '70000'" in p.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        p = run_layerwarm(
            "worker",
            "--node",
            "x",
            "--metrics-port",
            str(port),
            "--broker",
            broker,
            cache_dir=tmp_path / "cache",
            timeout=30,
        )
    assert p.returncode == 1, p.stderr
    assert p.stderr.strip().splitlines()[-1] == (
        f"layerwarm: cannot serve metrics on 127.0.0.1:{port}: Address already in use"
    )
    assert "celery" not in p.stderr.lower(), "no worker may start without its metrics"
