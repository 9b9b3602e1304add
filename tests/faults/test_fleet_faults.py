"""Faults in a fleet of real `layerwarm worker` processes: the registry budget shared by
three workers, the shared tier (S3) down and back, `kill -9` of a worker in decompress and
in publish, and the broker (Redis) restarted with layers in flight.

Every fleet here runs on a private `redis-server` (never the shared one on 6379), with
AOF persistence on, as a production broker should have it: Celery keeps queued and
unacknowledged messages in Redis, and a Redis without persistence comes back empty after
a restart. Visibility timeout and lease TTL are short so that redelivery after a kill
takes seconds, not hours.

Each test checks the job's final state and that every `sha256_*` file in every node's
cache directory and every S3 object is the right layer tar, byte for byte.
"""

from __future__ import annotations

import json
import random
import re
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.support.cli import entries
from tests.support.faults import (
    Known,
    RedisServer,
    S3Proxy,
    cache_name,
    ensure_all_nodes,
    freeze,
    job_status,
    kill9,
    kill9_worker,
    layer_states,
    max_in_window,
    node_alive,
    restart_node,
    s3_objects,
    wait_node_exit,
    worker_tree,
)
from tests.support.fleet import Fleet, FleetError, ThrottledProxy
from tests.support.images import Dir, File, Image, Layer, make_tar, random_tar
from tests.support.procs import ServiceError
from tests.support.proxy import Proxy
from tests.support.registry import RegistryServer
from tests.support.s3 import S3Server

PREFIX = "layers"
NODES = ("a", "b", "c")
VISIBILITY_TIMEOUT = 12  # LAYERWARM_VISIBILITY_TIMEOUT: a killed worker's task returns after it
LEASE_TTL = 6  # LAYERWARM_LEASE_TTL
RATE = 5  # LAYERWARM_REGISTRY_RATE of the three-node fleet; burst = rate
KNOWN = Known()


def repo() -> str:
    return f"t/{uuid.uuid4().hex[:10]}"


def layer(seed: int, compression: str = "gzip", size: int = 100_000) -> Layer:
    return KNOWN.add(Layer(random_tar(seed, size), compression))


def text_layer(seed: int, size: int) -> Layer:
    """A tar of ``size`` bytes of text, gzip: a small blob that takes a while to expand
    (about 150:1, under the 1000:1 bomb limit)."""
    rng = random.Random(seed)
    words = "layer blob digest manifest cache warm verify stream fetch publish".split()
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 12))) for _ in range(200)]
    block = ("\n".join(lines) + "\n").encode()
    data = (block * (size // len(block) + 1))[:size]
    return KNOWN.add(Layer(make_tar([Dir("text"), File("text/words.txt", data)]), "gzip"))


def push(registry: RegistryServer, proxy: Proxy, images: Sequence[Image]) -> list[str]:
    refs = []
    for img in images:
        r = repo()
        registry.push_image(r, "1", img)
        refs.append(f"{proxy.host}/{r}:1")
    return refs


def by_digest(status: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    return {x["digest"]: x for x in (status or {}).get("layers", [])}


def node_of(fleet: Fleet, host: str | None) -> str:
    assert host is not None, "a layer in progress has no host in the status"
    node = re.sub(r"^(io|cpu)@", "", host)
    assert node in fleet.nodes, f"status host {host!r} is none of {sorted(fleet.nodes)}"
    return node


def problems(fleet: Fleet, s3: S3Server, bucket: str) -> list[str]:
    """Every cache entry on every node and every S3 object that is not a whole, known layer."""
    found = KNOWN.check_objects("S3", s3_objects(s3.client(), bucket, PREFIX))
    for name, node in fleet.nodes.items():
        found += KNOWN.check_dir(f"node {name}", node.cache_dir)
    return found


def assert_done(fleet: Fleet, s3: S3Server, bucket: str, status: dict[str, Any],
                layers: Sequence[Layer], context: str = "") -> None:
    """The job is done, each of ``layers`` done and in S3, and nothing anywhere is wrong."""
    detail = f"{context}\nfinal status: {json.dumps(status, indent=1)[:3000]}"
    assert status["state"] == "done", detail
    assert {x["digest"] for x in status["layers"]} == {lay.digest for lay in layers}, detail
    for x in status["layers"]:
        assert x["state"] == "done" and x["reason"] is None, detail
        assert x["bytes_done"] == x["bytes_total"], detail
    stored = s3_objects(s3.client(), bucket, PREFIX)
    missing = [cache_name(lay) for lay in layers if cache_name(lay) not in stored]
    assert missing == [], f"not in S3: {missing}{detail}"
    assert problems(fleet, s3, bucket) == [], detail


def wait_state(fleet: Fleet, job_id: str, digest: str, wanted: Sequence[str], *,
               allowed: Sequence[str], timeout: float = 60,
               poll: float = 0.02) -> dict[str, Any]:
    """Poll the job record in Redis until layer ``digest`` is in a ``wanted`` state.

    Fails if the layer shows a state outside ``allowed`` + ``wanted`` first (it got past
    the stage the test wants to interrupt).
    """
    deadline = time.monotonic() + timeout
    entry: dict[str, Any] | None = None
    while True:
        status = job_status(fleet.broker_url, job_id)
        entry = by_digest(status).get(digest)
        state = entry["state"] if entry else "pending"
        if state in wanted:
            assert entry is not None
            return entry
        assert state in allowed, (
            f"layer {digest} got to {state!r} before it was seen in {list(wanted)}: {entry}"
        )
        assert time.monotonic() < deadline, (
            f"layer {digest} not {list(wanted)} within {timeout:.0f}s: {entry}\n{fleet.logs()}"
        )
        time.sleep(poll)


def wait_finished(fleet: Fleet, job_id: str, timeout: float) -> tuple[dict[str, Any] | None, str]:
    """Poll the job record until the job is done or failed, the timeout passes, or no node
    of the fleet is left running to finish it; returns (last status, why it stopped)."""
    deadline = time.monotonic() + timeout
    all_dead_since: float | None = None
    while True:
        status = job_status(fleet.broker_url, job_id)
        if status is not None and status["state"] in ("done", "failed"):
            return status, status["state"]
        if any(node_alive(fleet, n) for n in fleet.nodes):
            all_dead_since = None
        elif all_dead_since is None:
            all_dead_since = time.monotonic()
        elif time.monotonic() - all_dead_since > 3:
            return status, "every node of the fleet has exited"
        if time.monotonic() > deadline:
            return status, f"not finished within {timeout:.0f}s"
        time.sleep(0.5)


def start(fleet: Fleet) -> Fleet:
    try:
        return fleet.start()
    except FleetError as exc:
        message = f"the layerwarm worker fleet did not start: {exc}"
    pytest.fail(message, pytrace=False)


def private_redis(workdir: Path) -> RedisServer:
    try:
        return RedisServer(workdir, appendonly=True).start()
    except ServiceError as exc:
        message = str(exc)
    pytest.fail(message, pytrace=False)


# ---------------------------------------------------------------- the three-node fleet


@pytest.fixture(scope="module")
def s3proxy(s3: S3Server) -> Iterator[S3Proxy]:
    """The workers' S3 endpoint: a fault proxy in front of moto (tests read moto directly)."""
    with S3Proxy(s3.url) as proxy:
        yield proxy


@pytest.fixture(scope="module")
def bucket(s3: S3Server) -> str:
    return s3.create_bucket(f"faults-{uuid.uuid4().hex[:8]}")


@pytest.fixture(scope="module")
def fleet(
    tmp_path_factory: pytest.TempPathFactory, s3: S3Server, s3proxy: S3Proxy, bucket: str
) -> Iterator[Fleet]:
    """Nodes a, b, c on a private Redis, S3 through ``s3proxy``, a registry budget of 5/s."""
    root = tmp_path_factory.mktemp("fault-fleet")
    redis_server = private_redis(root / "redis")
    env = {**s3proxy.env(s3.env()), "LAYERWARM_REGISTRY_RATE": str(RATE)}
    f = Fleet(root, NODES, redis_server.url(0), f"s3://{bucket}/{PREFIX}", env,
              visibility_timeout=VISIBILITY_TIMEOUT, lease_ttl=LEASE_TTL)
    try:
        start(f)
        yield f
    finally:
        f.stop()
        redis_server.stop()


@pytest.fixture
def healthy(fleet: Fleet, s3proxy: S3Proxy) -> Iterator[Fleet]:
    """The fleet with every node running and the S3 proxy clean, before and after a test."""
    ensure_all_nodes(fleet)
    s3proxy.clear_rules()
    s3proxy.unthrottle()
    yield fleet
    s3proxy.clear_rules()
    s3proxy.unthrottle()


# ---------------------------------------------------------------- 8. registry budget


def test_registry_budget_is_held_across_three_workers(
    healthy: Fleet, registry: RegistryServer, registry_proxy: Proxy, s3: S3Server, bucket: str
) -> None:
    fleet = healthy
    layers = [layer(5000 + i, ("gzip", "zstd", "none")[i % 3], 20_000) for i in range(24)]
    images = [Image(layers[i : i + 6]) for i in range(0, 24, 6)]
    refs = push(registry, registry_proxy, images)
    registry_proxy.reset()

    p = fleet.submit(*refs, "--to", "remote", "--wait", "--json", timeout=240)
    assert p.returncode == 0, f"{p.stderr[-3000:]}\n{fleet.logs()}"
    status = json.loads(p.stdout)
    assert_done(fleet, s3, bucket, status, layers)
    hits = registry_proxy.requests_log
    assert len(hits) >= 24 + 4 + 4, f"{len(hits)} registry requests for 4 images of 6 layers"
    busiest = max_in_window([h.at for h in hits])
    assert busiest <= RATE + RATE, (
        f"{busiest} registry requests within one second; the fleet budget is {RATE}/s with a "
        f"burst of {RATE}"
    )
    hosts = {node_of(fleet, x["host"]) for x in status["layers"]}
    assert len(hosts) >= 2, f"all layers were fetched by {hosts}: the budget was not shared"


# ---------------------------------------------------------------- 7. S3 down, then up


def test_s3_outage_node_job_warms_from_registry_and_publishes_later(
    healthy: Fleet, s3proxy: S3Proxy, registry: RegistryServer, registry_proxy: Proxy,
    s3: S3Server, bucket: str,
) -> None:
    """A node target is satisfied by the node's disk: while S3 refuses everything the job
    still ends done, each layer `done` with `publish: pending`; once S3 answers again the
    publishes retried in the background land the layers there (`publish: done`)."""
    fleet = healthy
    layers = [layer(5100, "gzip", 200_000), layer(5101, "zstd"), layer(5102, "none")]
    refs = push(registry, registry_proxy, [Image(layers[:2]), Image([layers[0], layers[2]])])
    names = {cache_name(lay) for lay in layers}
    s3proxy.fail(r".", 500, times=None)  # every S3 request: 500 until clear_rules()

    job_id = fleet.submit_id(*refs, "--to", "node:a")
    seen: list[Any] = []

    def observe() -> dict[str, Any] | None:
        status = job_status(fleet.broker_url, job_id)
        if status is not None:
            now = (status["state"],
                   sorted((x["digest"][7:19], x["state"], x["publish"]) for x in status["layers"]))
            if not seen or seen[-1] != now:
                seen.append(now)
        return status

    deadline = time.monotonic() + 25
    during = observe()
    while time.monotonic() < deadline and not (during and during["state"] in ("done", "failed")):
        time.sleep(0.2)
        during = observe()
    time.sleep(2)  # a publish retry or two more while S3 is still down
    during = observe()
    disk_during = entries(fleet.cache_dir("a")) & names
    disk_problems = KNOWN.check_dir("node a", fleet.cache_dir("a"))
    s3_during = set(s3_objects(s3.client(), bucket, PREFIX)) & names
    refused = sum(1 for h in s3proxy.requests_log if h.status == 500)

    s3proxy.clear_rules()  # S3 is back
    back_at = time.monotonic()
    final = observe()
    while time.monotonic() < back_at + 45:
        stored = set(s3_objects(s3.client(), bucket, PREFIX)) & names
        published = final is not None and all(x["publish"] == "done" for x in final["layers"])
        if stored == names and published and final["state"] in ("done", "failed"):
            break
        time.sleep(0.5)
        final = observe()
    report = (
        f"\nduring the outage: {len(disk_during)}/{len(layers)} layers on a's disk, "
        f"{refused} S3 requests refused\njob state, (layer, state, publish) as they changed: "
        + "\n  ".join(map(str, seen))
        + f"\nstatus during the outage: {json.dumps(during, indent=1)[:2500]}"
        + f"\n{time.monotonic() - back_at:.0f}s after S3 came back: "
        + json.dumps(final, indent=1)[:2500]
    )
    assert refused > 0, "no worker asked S3 anything during the outage: nothing tested"
    assert s3_during == set(), f"S3 objects appeared while S3 refused everything{report}"
    assert disk_problems == [], report
    # The registry still works: a node target gets its layers while the shared tier is down.
    assert disk_during == names, (
        f"layers did not reach node a's disk during the outage{report}\n{fleet.logs()}"
    )
    assert during is not None and during["state"] == "done", report
    for entry in during["layers"]:
        assert (entry["state"], entry["publish"]) == ("done", "pending"), report
    assert final is not None
    for entry in final["layers"]:
        assert (entry["state"], entry["publish"]) == ("done", "done"), report
    assert_done(fleet, s3, bucket, fleet.status(job_id), layers, report)
    for lay in layers:
        assert (fleet.cache_dir("a") / cache_name(lay)).read_bytes() == lay.tar


# ---------------------------------------------------------------- 5. kill -9 mid-stage


def test_kill_9_of_the_cpu_worker_in_decompress_loses_nothing(
    healthy: Fleet, registry: RegistryServer, registry_proxy: Proxy, s3: S3Server, bucket: str
) -> None:
    fleet = healthy
    big = text_layer(5200, 160_000_000)
    small = layer(5201, "zstd", 50_000)
    refs = push(registry, registry_proxy, [Image([small, big])])
    cpu_workers = {n: worker_tree(fleet, n, "cpu") for n in NODES}

    job_id = fleet.submit_id(*refs, "--to", "remote")
    entry = wait_state(fleet, job_id, big.digest, ["decompressing"],
                       allowed=["pending", "fetching"])
    victim = node_of(fleet, entry["host"])
    freeze(cpu_workers[victim])  # stop it where it is, then look, then kill
    committed = (fleet.cache_dir(victim) / cache_name(big)).exists()
    killed = kill9(cpu_workers[victim])
    killed_at = time.monotonic()
    assert killed and not committed, (
        f"the kill came after {victim}'s decompression had committed the entry: nothing tested"
    )
    wait_node_exit(fleet, victim)  # a host with half its pools stops the other half
    during = job_status(fleet.broker_url, job_id)
    assert cache_name(big) not in s3_objects(s3.client(), bucket, PREFIX)
    assert problems(fleet, s3, bucket) == [], "a partial entry after the kill"

    restart_node(fleet, victim)  # decompress is routed to the victim's own CPU queue
    final = fleet.wait_done(job_id, timeout=VISIBILITY_TIMEOUT + 120)[job_id]
    took = time.monotonic() - killed_at
    report = (f"\nkilled cpu@{victim} at {entry}; status while it was down: "
              f"{json.dumps(by_digest(during).get(big.digest))}; finished {took:.0f}s after")
    assert_done(fleet, s3, bucket, final, [small, big], report)
    assert (fleet.cache_dir(victim) / cache_name(big)).read_bytes() == big.tar, report
    assert node_of(fleet, by_digest(final)[big.digest]["host"]) == victim, report
    assert took < VISIBILITY_TIMEOUT + 90, report


def test_kill_9_of_the_io_worker_in_publish_loses_nothing(
    healthy: Fleet, s3proxy: S3Proxy, registry: RegistryServer, registry_proxy: Proxy,
    s3: S3Server, bucket: str,
) -> None:
    fleet = healthy
    lay = layer(5300, "none", 8_000_000)
    small = layer(5301, "gzip", 50_000)
    refs = push(registry, registry_proxy, [Image([small, lay])])
    s3proxy.throttle_uploads(1_000_000)  # ~8 s for the big PUT

    # To the remote tier: the layer is done only once published, so the job shows it.
    job_id = fleet.submit_id(*refs, "--to", "remote")
    entry = wait_state(fleet, job_id, lay.digest, ["publishing"],
                       allowed=["pending", "fetching", "decompressing"], poll=0.1)
    victim = node_of(fleet, entry["host"])
    uploaded = s3proxy.uploaded
    deadline = time.monotonic() + 10
    while s3proxy.uploaded < uploaded + 500_000:  # bytes of the layer are on the wire
        assert time.monotonic() < deadline, "the publish sends nothing"
        time.sleep(0.05)
    killed = kill9_worker(fleet, victim, "io")
    killed_at = time.monotonic()
    s3proxy.unthrottle()
    assert killed
    wait_node_exit(fleet, victim)
    during = job_status(fleet.broker_url, job_id)
    if cache_name(lay) not in s3_objects(s3.client(), bucket, PREFIX):
        assert any(cache_name(lay) in d for d in s3proxy.dropped), (
            f"the kill did not cut the upload of {cache_name(lay)}: {s3proxy.dropped}"
        )
    # else the whole body was already in the kernel's socket buffers when the worker died,
    # and S3 got all of it: problems() below holds it to the exact bytes.
    assert problems(fleet, s3, bucket) == [], "a partial entry after the kill"

    restart_node(fleet, victim)  # publish is routed to the victim's own IO queue
    final = fleet.wait_done(job_id, timeout=VISIBILITY_TIMEOUT + 120)[job_id]
    took = time.monotonic() - killed_at
    report = (f"\nkilled io@{victim} at {entry}; status while it was down: "
              f"{json.dumps(by_digest(during).get(lay.digest))}; finished {took:.0f}s after; "
              f"S3 proxy dropped {s3proxy.dropped}")
    assert_done(fleet, s3, bucket, final, [small, lay], report)
    assert (fleet.cache_dir(victim) / cache_name(lay)).read_bytes() == lay.tar, report
    assert took < VISIBILITY_TIMEOUT + 90, report


# ---------------------------------------------------------------- 6. Redis restart


def test_redis_restart_with_layers_in_flight_loses_nothing(
    tmp_path: Path, registry: RegistryServer, s3: S3Server
) -> None:
    redis_server = private_redis(tmp_path / "redis")
    own_bucket = s3.create_bucket(f"restart-{uuid.uuid4().hex[:8]}")
    layers = [layer(5400 + i, ("none", "gzip", "zstd")[i % 3], 1_500_000) for i in range(6)]
    try:
        with ThrottledProxy(registry.url) as proxy:
            refs = push(registry, proxy, [Image(layers[:3]), Image(layers[3:])])
            proxy.throttle_path(r"/blobs/sha256:", 400_000)  # a few seconds a blob
            fleet = Fleet(tmp_path / "fleet", ("a", "b"), redis_server.url(0),
                          f"s3://{own_bucket}/{PREFIX}", s3.env(),
                          visibility_timeout=VISIBILITY_TIMEOUT, lease_ttl=LEASE_TTL)
            start(fleet)
            try:
                job_id = fleet.submit_id(*refs, "--to", "remote")
                deadline = time.monotonic() + 60
                while True:
                    before = job_status(fleet.broker_url, job_id)
                    if any(x["state"] == "fetching" and x["bytes_done"] > 0
                           for x in by_digest(before).values()):
                        break
                    assert time.monotonic() < deadline, f"nothing in flight: {before}"
                    time.sleep(0.1)
                down_for = redis_server.restart()
                after = job_status(fleet.broker_url, job_id)
                time.sleep(2)
                proxy.unthrottle()
                final, why = wait_finished(fleet, job_id, timeout=VISIBILITY_TIMEOUT + 90)
                dead = [n for n in fleet.nodes if not node_alive(fleet, n)]
                report = (f"\nRedis was down {down_for:.1f}s; states before "
                          f"{layer_states(before)}; after {layer_states(after)}; "
                          f"at the end ({why}) {layer_states(final)}; nodes exited: {dead}")
                assert after is not None, f"the job record did not survive the restart{report}"
                assert final is not None and final["state"] == "done", (
                    f"{report}\n{json.dumps(final, indent=1)[:3000]}\n{fleet.logs()}"
                )
                assert_done(fleet, s3, own_bucket, fleet.status(job_id), layers, report)
                # A broker restart is a blip, not the end of a worker host.
                assert dead == [], (
                    f"node(s) {dead} exited after the Redis restart{report}\n{fleet.logs()}"
                )
                live = json.loads(fleet.run("nodes", "--json", timeout=60).stdout)
                assert sorted(live) == sorted(fleet.nodes), f"live nodes {live}{report}"
            finally:
                fleet.stop()
    finally:
        redis_server.stop()
