"""Faults in a fleet of real `layerwarm worker` processes: the registry budget shared by
three workers, the shared tier (S3) down and back, `kill -9` of a worker in decompress and
in publish, and the broker (Redis) restarted with layers in flight.

Every fleet here runs on a private `redis-server` (never the shared one on 6379), with
AOF persistence on, as a production broker should have it: Celery keeps queued and
unacknowledged messages in Redis, and a Redis without persistence comes back empty after
a restart. Visibility timeout and lease TTL are short so that redelivery after a kill
takes seconds, not hours.

A stage that a fault must hit mid-way is held there by a proxy (``Hold``: the registry
proxy keeps a blob's last bytes, the S3 proxy an upload's) until the test releases it, so
the fault lands in that stage however busy the machine is.

Each test checks the job's final state and that every `sha256_*` file in every node's
cache directory and every S3 object is the right layer tar, byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.support.cli import entries, leftovers, run_layerwarm
from tests.support.faults import RedisServer, S3Proxy, layer_states, max_in_window
from tests.support.fleet import Fleet, push, running_fleet
from tests.support.fleetcheck import (
    Known,
    S3Tier,
    by_digest,
    cache_name,
    job_status,
    node_of,
    wait_layer,
)
from tests.support.images import Image, Layer, random_tar
from tests.support.procs import ServiceError
from tests.support.proxy import Hold, Proxy
from tests.support.registry import RegistryServer
from tests.support.s3 import S3Server

NODES = ("a", "b", "c")
VISIBILITY_TIMEOUT = 12  # LAYERWARM_VISIBILITY_TIMEOUT: a killed worker's task returns after it
LEASE_TTL = 6  # LAYERWARM_LEASE_TTL
RATE = 5  # LAYERWARM_REGISTRY_RATE of the three-node fleet; burst = rate
# Bytes a hold keeps back: more than the registry client reads at once (1 MiB), so the
# fetch has had all the rest and wants only those.
HELD = 2 << 20
KNOWN = Known()


def layer(seed: int, compression: str = "gzip", size: int = 100_000) -> Layer:
    return KNOWN.add(Layer(random_tar(seed, size), compression))


def assert_done(fleet: Fleet, tier: S3Tier, status: dict[str, Any],
                layers: Sequence[Layer], context: str = "") -> None:
    """The job is done, each of ``layers`` done and in S3, and nothing anywhere is wrong."""
    detail = f"{context}\nfinal status: {json.dumps(status, indent=1)[:3000]}"
    assert status["state"] == "done", detail
    assert {x["digest"] for x in status["layers"]} == {lay.digest for lay in layers}, detail
    for x in status["layers"]:
        assert x["state"] == "done" and x["reason"] is None, detail
        assert x["bytes_done"] == x["bytes_total"], detail
    stored = tier.objects()
    missing = [cache_name(lay) for lay in layers if cache_name(lay) not in stored]
    assert missing == [], f"not in S3: {missing}{detail}"
    assert KNOWN.problems(fleet, tier) == [], detail


def wait_finished(fleet: Fleet, job_id: str, timeout: float) -> tuple[dict[str, Any] | None, str]:
    """Poll the job record until the job is done or failed, the timeout passes, or no node
    of the fleet is left running to finish it; returns (last status, why it stopped)."""
    deadline = time.monotonic() + timeout
    all_dead_since: float | None = None
    while True:
        status = job_status(fleet.broker_url, job_id)
        if status is not None and status["state"] in ("done", "failed"):
            return status, status["state"]
        if any(fleet.alive(n) for n in fleet.nodes):
            all_dead_since = None
        elif all_dead_since is None:
            all_dead_since = time.monotonic()
        elif time.monotonic() - all_dead_since > 3:
            return status, "every node of the fleet has exited"
        if time.monotonic() > deadline:
            return status, f"not finished within {timeout:.0f}s"
        time.sleep(0.5)


def submit_mid_download(fleet: Fleet, registry_proxy: Proxy, refs: Sequence[str], lay: Layer,
                        target: str) -> tuple[str, Hold, dict[str, Any]]:
    """Submit `refs` to `target` with the blob of `lay` held short of its end; return the job
    id, the hold (the test releases it) and the layer's status entry once it is fetching."""
    hold = registry_proxy.hold(f"/blobs/{lay.digest}", HELD)
    job_id = fleet.submit_id(*refs, "--to", target)
    hold.wait(timeout=120)
    entry = wait_layer(fleet, job_id, lay.digest, ["fetching"], allowed=["pending"])
    return job_id, hold, entry


def tmp_files(cache_dir: Path, lay: Layer) -> dict[str, int]:
    """Files being written for ``lay`` in the cache's ``.tmp/`` (a decompression's output
    before its commit), with their sizes."""
    out = {}
    for path in (cache_dir / ".tmp").glob(cache_name(lay) + ".*"):
        try:
            out[path.name] = path.stat().st_size
        except FileNotFoundError:
            continue
    return out


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
def tier(s3: S3Server) -> S3Tier:
    return S3Tier.new(s3, "faults")


@pytest.fixture(scope="module")
def fleet(
    tmp_path_factory: pytest.TempPathFactory, s3: S3Server, s3proxy: S3Proxy, tier: S3Tier
) -> Iterator[Fleet]:
    """Nodes a, b, c on a private Redis, S3 through ``s3proxy``, a registry budget of 5/s."""
    root = tmp_path_factory.mktemp("fault-fleet")
    redis_server = private_redis(root / "redis")
    env = {**s3proxy.env(s3.env()), "LAYERWARM_REGISTRY_RATE": str(RATE)}
    try:
        with running_fleet(root, NODES, redis_server.url(0), tier, env,
                           visibility_timeout=VISIBILITY_TIMEOUT, lease_ttl=LEASE_TTL) as f:
            yield f
    finally:
        redis_server.stop()


@pytest.fixture
def healthy(fleet: Fleet, s3proxy: S3Proxy) -> Iterator[Fleet]:
    """The fleet with every node running and the S3 proxy clean, before and after a test."""
    fleet.ensure_all()
    s3proxy.clear_rules()
    s3proxy.unthrottle()
    yield fleet
    s3proxy.clear_rules()
    s3proxy.unthrottle()


# ---------------------------------------------------------------- 8. registry budget


def test_registry_budget_is_held_across_three_workers(
    healthy: Fleet, registry: RegistryServer, registry_proxy: Proxy, tier: S3Tier
) -> None:
    fleet = healthy
    layers = [layer(5000 + i, ("gzip", "zstd", "none")[i % 3], 20_000) for i in range(24)]
    images = [Image(layers[i : i + 6]) for i in range(0, 24, 6)]
    refs = push(registry, registry_proxy, images)
    registry_proxy.reset()

    p = fleet.submit(*refs, "--to", "remote", "--wait", "--json", timeout=240)
    assert p.returncode == 0, f"{p.stderr[-3000:]}\n{fleet.logs()}"
    status = json.loads(p.stdout)
    assert_done(fleet, tier, status, layers)
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
    tier: S3Tier,
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

    # A bound for a loaded machine; on a quiet one the job is done in a few seconds.
    deadline = time.monotonic() + 90
    during = observe()
    while time.monotonic() < deadline and not (during and during["state"] in ("done", "failed")):
        time.sleep(0.2)
        during = observe()
    # A publish retry or two more while S3 is still down. The assertions below hold for
    # any number of them (none included): S3 refuses everything until clear_rules().
    time.sleep(2)
    during = observe()
    disk_during = entries(fleet.cache_dir("a")) & names
    disk_problems = KNOWN.check_dir("node a", fleet.cache_dir("a"))
    s3_during = set(tier.objects()) & names
    refused = sum(1 for h in s3proxy.requests_log if h.status == 500)

    s3proxy.clear_rules()  # S3 is back
    back_at = time.monotonic()
    final = observe()
    while time.monotonic() < back_at + 45:
        stored = set(tier.objects()) & names
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
    assert_done(fleet, tier, fleet.status(job_id), layers, report)
    for lay in layers:
        assert (fleet.cache_dir("a") / cache_name(lay)).read_bytes() == lay.tar


# ---------------------------------------------------------------- 5. kill -9 mid-stage


def test_kill_9_of_the_cpu_worker_in_decompress_loses_nothing(
    healthy: Fleet, registry: RegistryServer, registry_proxy: Proxy, tier: S3Tier
) -> None:
    """The CPU worker decompressing a layer is killed while its decompression is mid-way;
    a new one finishes the job with the right bytes, and nothing partial is left."""
    fleet = healthy
    big = layer(5200, "gzip", 8_000_000)  # random bytes: the gzip blob is as big as the tar
    small = layer(5201, "zstd", 50_000)
    refs = push(registry, registry_proxy, [Image([small, big])])
    # The decompression follows the download as it arrives and commits only once the fetch
    # has verified the whole blob. Holding the blob's last bytes at the proxy keeps the
    # fetch unverified, so the decompression is stuck mid-way until the test releases them.
    job_id, hold, entry = submit_mid_download(fleet, registry_proxy, refs, big, "remote")
    victim = node_of(fleet, entry["host"])
    cache = fleet.cache_dir(victim)
    # The decompression has started: its output grows in .tmp (it cannot finish).
    deadline = time.monotonic() + 120
    while not any(tmp_files(cache, big).values()):
        assert time.monotonic() < deadline, (
            f"no decompressed bytes of {big.digest} in {cache}/.tmp while its blob was held\n"
            f"{fleet.logs()}"
        )
        time.sleep(0.05)
    orphans = tmp_files(cache, big)
    killed = fleet.kill9(victim, "cpu")
    assert killed, f"no cpu@{victim} process to kill"
    # Provably mid-way: the blob is not whole yet, so nothing may be named or published.
    assert not (cache / cache_name(big)).exists(), "an entry was named before its blob verified"
    assert cache_name(big) not in tier.objects()
    assert KNOWN.problems(fleet, tier) == [], "a partial entry after the kill"
    during = by_digest(job_status(fleet.broker_url, job_id)).get(big.digest)
    assert during is not None and during["state"] != "done", during

    hold.release()  # the fetch ends; the host, its CPU worker gone, then stops
    released_at = time.monotonic()
    fleet.wait_exit(victim, timeout=60)
    fleet.restart(victim)  # decompress is routed to the victim's own CPU queue
    final = fleet.wait_done(job_id, timeout=VISIBILITY_TIMEOUT + 120)[job_id]
    took = time.monotonic() - released_at
    report = (f"\nkilled cpu@{victim} with {orphans} in its .tmp; status then: "
              f"{json.dumps(during)}; finished {took:.0f}s after the release")
    assert_done(fleet, tier, final, [small, big], report)
    data = (cache / cache_name(big)).read_bytes()
    assert "sha256:" + hashlib.sha256(data).hexdigest() == big.diff_id, report
    # The redelivered decompression runs on the victim (its own CPU queue). Its publish
    # goes on there too, unless the node's lease lapsed while every process of the node
    # was down (LEASE_TTL is shorter than a restart on a busy machine): then the publish
    # stands down and sends the fetch back to the fleet, and any node may finish it. Both
    # are right; the log says which happened.
    finisher = node_of(fleet, by_digest(final)[big.digest]["host"])
    if finisher != victim:
        stood_down = f"layer {big.digest}: lease on {big.digest} lost"
        assert stood_down in fleet.nodes[victim].log_path.read_text(), (
            f"finished on {finisher}, not on {victim}, without {victim} giving up its lease"
            + report)
    assert took < VISIBILITY_TIMEOUT + 90, report
    # What the killed decompression was writing stays behind as a temp file (a process
    # killed by SIGKILL cleans nothing up) and nothing else: gc sweeps it.
    assert set(leftovers(cache)) <= {f".tmp/{name}" for name in orphans}, report
    gc = run_layerwarm("gc", "--grace", "0", cache_dir=cache, timeout=60)
    assert gc.returncode == 0, gc.stderr
    assert leftovers(cache) == [], gc.stdout
    assert (cache / cache_name(big)).read_bytes() == big.tar


def test_kill_9_of_the_io_worker_in_publish_loses_nothing(
    healthy: Fleet, s3proxy: S3Proxy, registry: RegistryServer, registry_proxy: Proxy,
    tier: S3Tier,
) -> None:
    fleet = healthy
    lay = layer(5300, "none", 8_000_000)
    small = layer(5301, "gzip", 50_000)
    refs = push(registry, registry_proxy, [Image([small, lay])])
    # The S3 proxy reads the layer's upload but its last bytes, and forwards nothing to S3
    # before the test releases them: the publish is under way when its worker is killed.
    # The layer object itself, not its file index (`<name>.index`, put just before it).
    hold = s3proxy.hold_upload(re.escape(cache_name(lay)) + r"(\?|$)", HELD)

    # To the remote tier: the layer is done only once published, so the job shows it.
    job_id = fleet.submit_id(*refs, "--to", "remote")
    hold.wait(timeout=120)
    entry = wait_layer(fleet, job_id, lay.digest, ["publishing"],
                       allowed=["pending", "fetching", "decompressing"])
    victim = node_of(fleet, entry["host"])
    killed = fleet.kill9(victim, "io")
    assert killed, f"no io@{victim} process to kill"
    assert cache_name(lay) not in tier.objects(), "S3 got the object while its upload was held"
    hold.release()
    released_at = time.monotonic()
    fleet.wait_exit(victim)
    during = job_status(fleet.broker_url, job_id)
    if cache_name(lay) not in tier.objects():
        assert any(cache_name(lay) in d for d in s3proxy.dropped), (
            f"the kill did not cut the upload of {cache_name(lay)}: {s3proxy.dropped}"
        )
    # else the whole body was already in the kernel's socket buffers when the worker died,
    # and S3 got all of it: problems() below holds it to the exact bytes.
    assert KNOWN.problems(fleet, tier) == [], "a partial entry after the kill"

    fleet.restart(victim)  # publish is routed to the victim's own IO queue
    final = fleet.wait_done(job_id, timeout=VISIBILITY_TIMEOUT + 120)[job_id]
    took = time.monotonic() - released_at
    report = (f"\nkilled io@{victim} at {entry}; status while it was down: "
              f"{json.dumps(by_digest(during).get(lay.digest))}; finished {took:.0f}s after; "
              f"S3 proxy dropped {s3proxy.dropped}")
    assert_done(fleet, tier, final, [small, lay], report)
    assert (fleet.cache_dir(victim) / cache_name(lay)).read_bytes() == lay.tar, report
    assert took < VISIBILITY_TIMEOUT + 90, report


# ---------------------------------------------------------------- 6. Redis restart


def test_redis_restart_with_layers_in_flight_loses_nothing(
    tmp_path: Path, registry: RegistryServer, s3: S3Server
) -> None:
    redis_server = private_redis(tmp_path / "redis")
    own = S3Tier.new(s3, "restart")
    layers = [layer(5400 + i, ("none", "gzip", "zstd")[i % 3], 3_000_000) for i in range(6)]
    try:
        with Proxy(registry.url) as proxy:
            refs = push(registry, proxy, [Image(layers[:3]), Image(layers[3:])])
            # Every blob stops short of its end until the release: layers are in flight
            # while Redis goes down and comes back, however long that takes.
            hold = proxy.hold(r"/blobs/sha256:", HELD)
            with running_fleet(tmp_path / "fleet", ("a", "b"), redis_server.url(0), own,
                               s3.env(), visibility_timeout=VISIBILITY_TIMEOUT,
                               lease_ttl=LEASE_TTL) as fleet:
                job_id = fleet.submit_id(*refs, "--to", "remote")
                hold.wait(timeout=120)
                before = job_status(fleet.broker_url, job_id)
                down_for = redis_server.restart()
                after = job_status(fleet.broker_url, job_id)
                # Released at once: a worker that takes the lost connection badly does a
                # warm shutdown, which waits for its downloads, and the registry client
                # gives up on a silent blob after 60 s.
                in_flight = hold.held
                hold.release()
                final, why = wait_finished(fleet, job_id, timeout=VISIBILITY_TIMEOUT + 90)
                dead = [n for n in fleet.nodes if not fleet.alive(n)]
                report = (f"\nRedis was down {down_for:.1f}s with {len(in_flight)} blob "
                          f"downloads held; states before {layer_states(before)}; after "
                          f"{layer_states(after)}; at the end ({why}) {layer_states(final)}; "
                          f"nodes exited: {dead}")
                assert after is not None, f"the job record did not survive the restart{report}"
                assert final is not None and final["state"] == "done", (
                    f"{report}\n{json.dumps(final, indent=1)[:3000]}\n{fleet.logs()}"
                )
                assert_done(fleet, own, fleet.status(job_id), layers, report)
                # A broker restart is a blip, not the end of a worker host.
                assert dead == [], (
                    f"node(s) {dead} exited after the Redis restart{report}\n{fleet.logs()}"
                )
                live = json.loads(fleet.run("nodes", "--json", timeout=60).stdout)
                assert sorted(live) == sorted(fleet.nodes), f"live nodes {live}{report}"
    finally:
        redis_server.stop()


# ---------------------------------------------------------------- 7. restore under the lock


def test_a_node_restore_holds_the_digest_lock_until_its_entry_is_recorded(
    healthy: Fleet, registry: RegistryServer, registry_proxy: Proxy, s3proxy: S3Proxy,
    tier: S3Tier,
) -> None:
    """A node target restoring from S3 does it under the layer's lock, as every step of
    the chain runs: an `rm` (or gc) on that node waits for it instead of interleaving,
    which once left a row without a file and a job saying done."""
    import subprocess
    import threading

    from tests.support.cli import layerwarm_cmd, layerwarm_env

    fleet = healthy
    lay = layer(5500, "gzip", 3_000_000)
    [ref] = push(registry, registry_proxy, [Image([lay])])
    p = fleet.submit(ref, "--to", "remote", "--wait", timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    node = next(n for n, names in fleet.entries().items() if cache_name(lay) not in names)
    cache = fleet.cache_dir(node)

    hold = s3proxy.hold(cache_name(lay), 1 << 20)  # the object's GET, its last MiB held
    rm: subprocess.Popen[str] | None = None
    try:
        job_id = fleet.submit_id(ref, "--to", f"node:{node}")
        hold.wait(timeout=60)  # the restore is under way on `node`
        rm = subprocess.Popen(layerwarm_cmd("rm", lay.digest), env=layerwarm_env(cache),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        said: list[str] = []
        reader = threading.Thread(target=lambda: said.extend(iter(rm.stderr.readline, "")))
        reader.start()
        deadline = time.monotonic() + 60
        while not any("waiting for its lock" in x for x in said):
            assert rm.poll() is None, f"rm did not wait for the restore: {said}"
            assert time.monotonic() < deadline, f"rm said nothing: {said}"
            time.sleep(0.05)
        hold.release()
        out, _ = rm.communicate(timeout=60)
        reader.join(5)
    finally:
        hold.release()
        if rm is not None and rm.poll() is None:
            rm.kill()
    status = fleet.wait_done(job_id, timeout=60)[job_id]
    [x] = status["layers"]
    assert (x["state"], x["tier"]) == ("done", "remote"), x
    assert f"removed {lay.digest} from disk" in out, out  # the restored entry, whole
    assert cache_name(lay) not in entries(cache)
    p = run_layerwarm("ls", "--json", cache_dir=cache)
    assert p.returncode == 0 and lay.digest not in p.stdout, p.stdout  # no row left over
