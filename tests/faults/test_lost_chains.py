"""A layer whose chain was lost with its worker is carried on within minutes, not hours.

Real `layerwarm worker` nodes on a private Redis, with the visibility timeout left at an
hour: a message a killed worker held comes back only after that, so a job that finishes
within the test's bound was carried on by the sweeper (LAYERWARM_REQUEUE_AFTER, here 3 s).
The layer's download is held at the proxy (``Hold``) so the kill lands mid-layer however
busy the machine is. Also: a supervisor killed by SIGKILL takes its Celery workers with it.
"""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Iterator

import pytest

from tests.faults.test_fleet_faults import (
    HELD,
    assert_done,
    layer,
    private_redis,
    submit_mid_download,
)
from tests.support.faults import S3Proxy
from tests.support.fleet import Fleet, push, running_fleet
from tests.support.fleetcheck import S3Tier, by_digest, cache_name, job_status, node_of, wait_layer
from tests.support.images import Image
from tests.support.proctree import Pid, descendants
from tests.support.proxy import Proxy
from tests.support.registry import RegistryServer
from tests.support.s3 import S3Server

VISIBILITY_TIMEOUT = 3600  # far beyond any wait below: redelivery cannot be what finishes
REQUEUE_AFTER = 3
FINISH_WITHIN = 120  # generous for a busy machine; still 30 times below the visibility timeout


@pytest.fixture(scope="module")
def tier(s3: S3Server) -> S3Tier:
    return S3Tier.new(s3, "lost")


@pytest.fixture(scope="module")
def s3proxy(s3: S3Server) -> Iterator[S3Proxy]:
    """The workers' S3 endpoint: a proxy that can hold an upload (tests read moto directly)."""
    with S3Proxy(s3.url) as proxy:
        yield proxy


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, s3: S3Server, s3proxy: S3Proxy,
          tier: S3Tier) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("lost-chains")
    redis_server = private_redis(root / "redis")
    env = {**s3proxy.env(s3.env()), "LAYERWARM_REQUEUE_AFTER": str(REQUEUE_AFTER),
           "LAYERWARM_NODE_TTL": "2"}
    try:
        with running_fleet(root, ("a", "b"), redis_server.url(0), tier, env,
                           visibility_timeout=VISIBILITY_TIMEOUT, lease_ttl=6) as f:
            yield f
    finally:
        redis_server.stop()


@pytest.fixture
def healthy(fleet: Fleet) -> Fleet:
    fleet.ensure_all()
    return fleet


def kill_node(fleet: Fleet, node: str) -> None:
    """SIGKILL the node's supervisor and every Celery process under it, like a power cut."""
    proc = fleet.nodes[node].proc
    assert proc is not None
    tree = [proc.pid, *descendants(proc.pid)]
    for pid in tree:
        Pid(pid).signal(signal.SIGKILL)
    proc.wait(timeout=30)


def wait_state(fleet: Fleet, job_id: str, timeout: float = FINISH_WITHIN) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status = job_status(fleet.broker_url, job_id)
        if status is not None and status["state"] in ("done", "failed"):
            return status
        assert time.monotonic() < deadline, (
            f"job {job_id} not finished within {timeout}s: {status}\n{fleet.logs()}")
        time.sleep(0.5)


def test_a_fleet_layer_whose_node_died_is_fetched_by_another_node(
    healthy: Fleet, registry: RegistryServer, registry_proxy: Proxy, tier: S3Tier
) -> None:
    fleet = healthy
    big, small = layer(6100, "gzip", 6_000_000), layer(6101, "zstd", 50_000)
    refs = push(registry, registry_proxy, [Image([small, big])])
    job_id, hold, entry = submit_mid_download(fleet, registry_proxy, refs, big, "remote")
    victim = node_of(fleet, entry["host"])
    survivor = next(n for n in fleet.nodes if n != victim)
    kill_node(fleet, victim)
    hold.release()

    final = wait_state(fleet, job_id)
    report = f"\nkilled node {victim} mid-download\n{fleet.logs()}"
    assert_done(fleet, tier, final, [small, big], report)
    assert node_of(fleet, by_digest(final)[big.digest]["host"]) == survivor, report
    assert (fleet.cache_dir(survivor) / cache_name(big)).read_bytes() == big.tar
    log = fleet.nodes[survivor].log_path.read_text(errors="replace")
    assert f"node {victim}, which had it, is not running; fetch sent again" in log, report


def _entry_for(fleet: Fleet, job_id: str, node: str | None, *states: str) -> dict:
    """The job's entry for the layer on `node` (None: any node) once it is in `states`."""
    deadline = time.monotonic() + FINISH_WITHIN
    while True:
        status = job_status(fleet.broker_url, job_id) or {"layers": []}
        for entry in status["layers"]:
            if entry["state"] in states and node in (None, entry["target"][len("node:"):]):
                return entry
        assert time.monotonic() < deadline, f"no layer {states} on {node}: {status}\n" \
                                            f"{fleet.logs()}"
        time.sleep(0.2)


def test_an_all_nodes_layer_whose_first_node_died_is_fetched_by_the_other(
    healthy: Fleet, registry: RegistryServer, registry_proxy: Proxy, tier: S3Tier
) -> None:
    """`--to all-nodes` with a shared tier: one node fetches the layer and the other's
    fetch is sent when that one's chain ends. Killed mid-download, it never ends: the
    sweeper sees the node it waits for is not running and the other node fetches the
    layer itself; the killed node gets it when it is back."""
    fleet = healthy
    big = layer(6400, "gzip", 6_000_000)
    refs = push(registry, registry_proxy, [Image([big])])
    hold = registry_proxy.hold(f"/blobs/{big.digest}", HELD)
    try:
        job_id = fleet.submit_id(*refs, "--to", "all-nodes")
        hold.wait(timeout=120)
        first = _entry_for(fleet, job_id, None, "fetching")
        victim = node_of(fleet, first["host"])
        survivor = next(n for n in fleet.nodes if n != victim)
        assert _entry_for(fleet, job_id, survivor, "pending"), "the other node waits its turn"
        kill_node(fleet, victim)
    finally:
        hold.release()

    _entry_for(fleet, job_id, survivor, "done")
    report = f"\nkilled node {victim} mid-download\n{fleet.logs()}"
    assert (fleet.cache_dir(survivor) / cache_name(big)).read_bytes() == big.tar, report
    log = fleet.nodes[survivor].log_path.read_text(errors="replace")
    assert f"node {victim}, which was to fetch it first, is not running" in log, report
    fleet.restart(victim)
    final = wait_state(fleet, job_id)
    assert final["state"] == "done", f"{final}{report}"
    assert (fleet.cache_dir(victim) / cache_name(big)).read_bytes() == big.tar, report
    assert tier.objects()[cache_name(big)] == big.tar, report


def test_a_node_targets_layer_waits_for_its_node_and_goes_on_when_it_is_back(
    healthy: Fleet, registry: RegistryServer, registry_proxy: Proxy
) -> None:
    fleet = healthy
    big = layer(6200, "none", 6_000_000)
    refs = push(registry, registry_proxy, [Image([big])])
    job_id, hold, _ = submit_mid_download(fleet, registry_proxy, refs, big, "node:a")
    kill_node(fleet, "a")
    hold.release()

    # b's sweeper sees a gone: the layer goes back to pending, its fetch in a's queue.
    deadline = time.monotonic() + FINISH_WITHIN
    while by_digest(job_status(fleet.broker_url, job_id))[big.digest]["state"] != "pending":
        assert time.monotonic() < deadline, f"never back to pending\n{fleet.logs()}"
        time.sleep(0.2)
    fleet.restart("a")
    final = wait_state(fleet, job_id)
    assert final["state"] == "done", f"{final}\n{fleet.logs()}"
    assert (fleet.cache_dir("a") / cache_name(big)).read_bytes() == big.tar
    assert not (fleet.cache_dir("b") / cache_name(big)).exists(), "a node job ran elsewhere"


def test_a_worker_stopped_mid_upload_with_a_short_grace_is_carried_on(
    healthy: Fleet, registry: RegistryServer, registry_proxy: Proxy, s3proxy: S3Proxy,
    tier: S3Tier,
) -> None:
    """`docker stop` (10 s of grace, then SIGKILL) during a long upload: the task it held
    comes back with the host, or on another one, within minutes, not after the hour its
    message waits in Redis's unacked hash."""
    fleet = healthy
    big, small = layer(6300, "none", 6_000_000), layer(6301, "gzip", 50_000)
    refs = push(registry, registry_proxy, [Image([small, big])])
    # S3 gets all of the upload but its last bytes until the release: the publish is under
    # way, whatever the machine's speed, when the stop comes.
    hold = s3proxy.hold_upload(re.escape(cache_name(big)) + r"(\?|$)", HELD)
    try:
        job_id = fleet.submit_id(*refs, "--to", "remote")
        hold.wait(timeout=120)
        entry = wait_layer(fleet, job_id, big.digest, ["publishing"],
                           allowed=["pending", "fetching", "decompressing"])
        victim = node_of(fleet, entry["host"])
        proc = fleet.nodes[victim].proc
        assert proc is not None
        proc.send_signal(signal.SIGTERM)  # a warm shutdown waits for the held upload ...
        time.sleep(1)  # ... for the stop's grace (1 s here) ...
        kill_node(fleet, victim)  # ... and then everything left is killed
    finally:
        hold.release()
    fleet.restart(victim)
    final = wait_state(fleet, job_id)
    report = f"\nstopped node {victim} mid-upload\n{fleet.logs()}"
    assert_done(fleet, tier, final, [small, big], report)
    assert tier.objects()[cache_name(big)] == big.tar, report
    logs = "".join(n.log_path.read_text(errors="replace") for n in fleet.nodes.values())
    assert "fetch sent again" in logs, report


def test_the_celery_workers_of_a_supervisor_killed_by_sigkill_stop(healthy: Fleet) -> None:
    fleet = healthy
    proc = fleet.nodes["b"].proc
    assert proc is not None
    workers = [Pid(pid) for pid in descendants(proc.pid)]
    assert len(workers) >= 2, "the node runs an io@ and a cpu@ worker"
    Pid(proc.pid).signal(signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.monotonic() + 60
    while alive := [w.pid for w in workers if w.alive()]:
        assert time.monotonic() < deadline, f"orphaned Celery workers still run: {alive}"
        time.sleep(0.2)
    live = fleet.wait_for_nodes([], timeout=5)
    assert "b" not in live, live
