"""Distributed mode end to end: real Redis, real `layerwarm worker` processes, a real
registry behind the counting proxy, and a real S3 server as the shared tier.

What a user checks: exit codes, the job status, the bytes in every node's cache dir and
in S3, and how many times the registry served each blob ("fetched once" is counted at
the proxy, not assumed).
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import tarfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.support.cli import entries, run_layerwarm
from tests.support.fleet import (
    REPO_ROOT,
    Fleet,
    ThrottledProxy,
    broker_url_for,
    cli_cmd,
    push,
    running_fleet,
)
from tests.support.fleetcheck import Known, S3Tier, by_digest, cache_name, node_of, wait_layer
from tests.support.images import Image, Layer, random_tar
from tests.support.pagecache import resident
from tests.support.proctree import descendants
from tests.support.proxy import Proxy
from tests.support.registry import RegistryServer
from tests.support.s3 import S3Server
from workers.routing import spread
from workers.tasks import INLINE_DECOMPRESS_BYTES

FLEET_DB = 7  # the module fleet's Redis database (flushed at start)
KILL_DB = 8  # the kill -9 test's own fleet
VISIBILITY_TIMEOUT = 20  # LAYERWARM_VISIBILITY_TIMEOUT of every fleet here (Fleet's default)
NODES = ("a", "b", "c")
HELD = 2 << 20  # bytes a hold keeps back: more than the registry client reads at once

# Every layer any test here pushes, by cache name: whatever entry shows up in any cache
# dir or in S3 must be one of these, byte for byte.
KNOWN = Known()


def layer(seed: int, compression: str = "gzip", size: int = 100_000, **kw: Any) -> Layer:
    return KNOWN.add(Layer(random_tar(seed, size), compression, **kw))


def unique(layers: Sequence[Layer]) -> list[Layer]:
    return list({lay.digest: lay for lay in layers}.values())


def image_fleet(seed: int, count: int) -> tuple[list[Image], list[Layer]]:
    """``count`` images over 2 base and 3 middle layers, each with one layer of its own."""
    bases = [layer(seed, "gzip", 400_000), layer(seed + 1, "zstd", 300_000)]
    mids = [layer(seed + 2 + i, c, 150_000) for i, c in enumerate(("zstd", "gzip", "none"))]
    images = []
    for i in range(count):
        own = layer(seed + 10 + i, ("gzip", "zstd", "none")[i % 3], 60_000)
        fmt = "docker" if i % 4 == 0 else "oci"
        images.append(Image([bases[i % 2], mids[i % 3], own], format=fmt))
    return images, unique([lay for img in images for lay in img.layers])


def assert_everything_intact(fleet: Fleet, tier: S3Tier) -> None:
    """Every ``sha256_*`` in every node's cache dir and in S3 is a known layer, whole."""
    assert KNOWN.problems(fleet, tier) == []


def assert_layer_done(entry: dict[str, Any], lay: Layer) -> None:
    assert entry["state"] == "done", entry
    assert entry["reason"] is None, entry
    assert entry["bytes_total"] in (lay.size, len(lay.tar)), entry
    assert entry["bytes_done"] == entry["bytes_total"], entry
    assert entry["tier"] in ("disk", "remote", "registry"), entry


def submit_json(fleet: Fleet, *args: str) -> tuple[subprocess.CompletedProcess[str], dict]:
    p = fleet.submit(*args, "--wait", "--json")
    try:
        status = json.loads(p.stdout)
    except ValueError:
        pytest.fail(
            f"submit --wait --json printed no JSON (exit {p.returncode}): {p.stdout[:2000]!r}\n"
            f"stderr: {p.stderr[-3000:]}\n{fleet.logs()}"
        )
    return p, status


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tier(s3: S3Server) -> S3Tier:
    return S3Tier.new(s3, "fleet")


@pytest.fixture(scope="module")
def fleet(
    tmp_path_factory: pytest.TempPathFactory, redis_url: str, s3: S3Server, tier: S3Tier
) -> Iterator[Fleet]:
    """Three nodes a, b, c with S3 as the shared tier; shared by the tests of this module."""
    with running_fleet(tmp_path_factory.mktemp("fleet"), NODES,
                       broker_url_for(redis_url, FLEET_DB), tier, s3.env()) as f:
        yield f


# ---------------------------------------------------------------- tests


def test_fleet_file_to_remote_fetches_each_layer_once(
    fleet: Fleet, registry: RegistryServer, registry_proxy: Proxy, tier: S3Tier,
    tmp_path: Path, s3: S3Server,
) -> None:
    images, layers = image_fleet(1000, 10)
    refs = push(registry, registry_proxy, images)
    file = tmp_path / "fleet.txt"
    file.write_text("# the fleet\n" + "\n".join(refs) + "\n\n")

    p, status = submit_json(fleet, "-f", str(file), "--to", "remote")
    assert p.returncode == 0, f"{p.stderr[-3000:]}\n{fleet.logs()}"
    assert status["state"] == "done"
    assert status["target"] == "remote"
    assert sorted(status["refs"]) == sorted(refs)
    assert status["image_failures"] == []
    layers_by_digest = by_digest(status)
    assert len(status["layers"]) == len(layers) == 15, "one status entry per unique layer"
    assert set(layers_by_digest) == {lay.digest for lay in layers}
    for lay in layers:
        entry = layers_by_digest[lay.digest]
        assert_layer_done(entry, lay)
        assert entry["target"] == "remote"
        assert entry["tier"] == "registry", entry
        node_of(fleet, entry["host"])
    totals = status["totals"]
    assert (totals["layers"], totals["done"], totals["failed"], totals["pending"]) == (15, 15, 0, 0)
    assert totals["bytes_done"] == totals["bytes_total"]
    assert totals["bytes_total"] == sum(x["bytes_total"] for x in status["layers"])

    stored = tier.objects()
    for lay in layers:
        assert stored.get(cache_name(lay)) == lay.tar, f"{cache_name(lay)} missing or wrong in S3"
        # Its file index beside it, for any reader of the shared tier (checked against the
        # tar by assert_everything_intact).
        assert cache_name(lay) + ".index" in stored, f"no file index of {lay.digest} in S3"
        assert registry_proxy.count("GET", f"/blobs/{lay.digest}") == 1, lay.digest
    assert_everything_intact(fleet, tier)

    # Another host reads an image straight from the shared tier through the indexes the
    # workers published: every file as its layer holds it, and no layer fetched whole.
    reader, rootfs = tmp_path / "reader", tmp_path / "rootfs"
    done = run_layerwarm("export", refs[0], "--dir", str(rootfs), cache_dir=reader,
                         env={**s3.env(), "LAYERWARM_REMOTE": tier.url})
    assert done.returncode == 0, done.stderr
    files = 0
    for lay in images[0].layers:
        with tarfile.open(fileobj=io.BytesIO(lay.tar)) as tar:
            for m in tar.getmembers():
                if m.isfile():
                    files += 1
                    data = tar.extractfile(m).read()  # type: ignore[union-attr]
                    assert (rootfs / m.name).read_bytes() == data, m.name
    assert files >= len(images[0].layers)
    assert not list(reader.glob("sha256_*")), "a layer was restored whole"

    # The job is still there to ask about afterwards, with the same result.
    again = fleet.status(status["id"])
    assert again["state"] == "done"
    assert by_digest(again).keys() == layers_by_digest.keys()
    assert all(x["state"] == "done" for x in again["layers"])


def _disk_reads(fleet: Fleet) -> int:
    """Bytes the fleet's processes have read from storage (not the page cache) so far."""
    total = 0
    for node in fleet.nodes.values():
        if node.proc is None:
            continue
        for pid in (node.proc.pid, *descendants(node.proc.pid)):
            try:
                io_text = Path(f"/proc/{pid}/io").read_text()
            except OSError:  # gone meanwhile
                continue
            if m := re.search(r"^read_bytes: (\d+)", io_text, re.M):
                total += int(m.group(1))
    return total


def test_a_new_entry_is_published_from_the_page_cache_then_left_out_of_it(
    fleet: Fleet, registry: RegistryServer, registry_proxy: Proxy, tier: S3Tier
) -> None:
    """The CPU worker's decompress keeps the entry's pages for the IO worker's publish,
    which reads it next (its file digests, then the upload): no host reads it back from
    the disk. Once published, its pages leave the page cache."""
    lay = layer(1050, "gzip", 24_000_000)
    (ref,) = push(registry, registry_proxy, [Image([lay])])
    before = _disk_reads(fleet)
    p = fleet.submit(ref, "--to", "remote", "--wait")
    read = _disk_reads(fleet) - before
    assert p.returncode == 0, f"{p.stderr[-3000:]}\n{fleet.logs()}"
    assert tier.objects().get(cache_name(lay)) == lay.tar
    assert read < len(lay.tar) // 2, f"the hosts read {read} bytes back from their disks"
    (host,) = [n for n, names in fleet.entries().items() if cache_name(lay) in names]
    assert resident(fleet.cache_dir(host) / cache_name(lay)) <= 4096, \
        "the published entry is still in the page cache"


def test_to_node_puts_layers_on_that_node_only(
    fleet: Fleet, registry: RegistryServer, registry_proxy: Proxy, tier: S3Tier
) -> None:
    base = layer(1100, "zstd", 300_000)
    own1, own2 = layer(1101, "gzip"), layer(1102, "none")
    images = [Image([base, own1]), Image([base, own2], format="docker")]
    refs = push(registry, registry_proxy, images)

    p = fleet.submit(*refs, "--to", "node:b", "--wait")
    assert p.returncode == 0, f"{p.stderr[-3000:]}\n{fleet.logs()}"
    for lay in (base, own1, own2):
        hex12 = lay.digest.removeprefix("sha256:")[:12]
        assert hex12 in p.stdout, f"summary table does not list {hex12}:\n{p.stdout}"
        assert (fleet.cache_dir("b") / cache_name(lay)).read_bytes() == lay.tar
        assert registry_proxy.count("GET", f"/blobs/{lay.digest}") == 1, lay.digest
    mine = {cache_name(x) for x in (base, own1, own2)}
    cached = fleet.entries()
    assert cached["a"] & mine == set(), "node:b work landed on node a"
    assert cached["c"] & mine == set(), "node:b work landed on node c"
    assert_everything_intact(fleet, tier)

    # Node b's own cache knows which images use its layers, as after an embedded warm.
    u = run_layerwarm("usage", "--json", base.digest, cache_dir=fleet.cache_dir("b"))
    assert u.returncode == 0, u.stderr
    assert sorted(i["ref"] for i in json.loads(u.stdout)["images"]) == sorted(refs)


def test_to_all_nodes_fetches_once_and_restores_the_rest_from_s3(
    fleet: Fleet, registry: RegistryServer, registry_proxy: Proxy, tier: S3Tier
) -> None:
    shared = layer(1200, "gzip", 1_000_000)  # over 256 KiB: a fetch task of its own
    own = [layer(1201, "zstd"), layer(1202, "none"), layer(1203, "gzip")]
    assert len(shared.blob) > INLINE_DECOMPRESS_BYTES, "one node fetches it, the others follow"
    images = [Image([shared, own[0]]), Image([shared, own[1], own[2]], format="docker")]
    refs = push(registry, registry_proxy, images)
    layers = [shared, *own]

    p, status = submit_json(fleet, *refs, "--to", "all-nodes")
    assert p.returncode == 0, f"{p.stderr[-3000:]}\n{fleet.logs()}"
    assert status["state"] == "done"
    assert status["target"] == "all-nodes"
    pairs = Counter((x["digest"], x["target"]) for x in status["layers"])
    assert pairs == Counter({(lay.digest, f"node:{n}"): 1 for lay in layers for n in NODES}), (
        "all-nodes: one status entry per (layer, node)"
    )
    tiers: dict[str, list[str]] = {}
    for entry in status["layers"]:
        lay = next(x for x in layers if x.digest == entry["digest"])
        assert_layer_done(entry, lay)
        assert node_of(fleet, entry["host"]) == entry["target"].removeprefix("node:"), entry
        tiers.setdefault(lay.digest, []).append(entry["tier"])
    for lay in layers:
        assert sorted(tiers[lay.digest]) == ["registry", "remote", "remote"], (lay.digest, tiers)
        assert registry_proxy.count("GET", f"/blobs/{lay.digest}") == 1, lay.digest
        for n in NODES:
            path = fleet.cache_dir(n) / cache_name(lay)
            assert path.is_file(), f"node {n} lacks {cache_name(lay)}"
            assert path.read_bytes() == lay.tar
    assert status["totals"]["layers"] == status["totals"]["done"] == 12
    assert_everything_intact(fleet, tier)


def test_to_all_nodes_a_layer_its_first_node_fails_is_fetched_by_the_others(
    fleet: Fleet, registry: RegistryServer, registry_proxy: Proxy, tier: S3Tier
) -> None:
    """With a shared tier, one node fetches each layer and the others' fetches are sent
    when its chain ends. Ended by a failure, they go out all the same and fetch the
    layer themselves: nothing waits for a layer that will never be shared."""
    lay = layer(1210, "gzip", 1_000_000)  # not a tiny layer: those go in batches to all
    assert len(lay.blob) > INLINE_DECOMPRESS_BYTES
    refs = push(registry, registry_proxy, [Image([lay])])
    registry_proxy.reset()
    registry_proxy.fail(f"/blobs/{lay.digest}", status=404, times=1, method="GET")

    p, status = submit_json(fleet, *refs, "--to", "all-nodes", "--timeout", "120")
    assert p.returncode == 1, f"{p.stderr[-3000:]}\n{fleet.logs()}"
    assert status["state"] == "failed"
    by_state: dict[str, list[dict[str, Any]]] = {}
    for entry in status["layers"]:
        by_state.setdefault(entry["state"], []).append(entry)
    assert sorted(by_state) == ["done", "failed"] and len(by_state["failed"]) == 1, status
    (failed,) = by_state["failed"]
    assert "not found" in failed["reason"], failed["reason"]
    for entry in by_state["done"]:
        assert_layer_done(entry, lay)
        node = entry["target"].removeprefix("node:")
        assert (fleet.cache_dir(node) / cache_name(lay)).read_bytes() == lay.tar
    assert registry_proxy.count("GET", f"/blobs/{lay.digest}") == 2, "the 404, then one fetch"
    assert_everything_intact(fleet, tier)


def test_each_node_target_starts_on_its_own_share_of_the_layers() -> None:
    """all-nodes: every node gets every layer once, its own share (every n-th, largest
    first) before the rest, so the nodes do not all reach the same layer at once."""
    items, targets = list(range(7)), ["node:a", "node:b", "node:c"]
    pairs = spread(items, targets)
    assert Counter(pairs) == Counter({(i, t): 1 for i in items for t in targets})
    for j, t in enumerate(targets):
        order = [i for i, x in pairs if x == t]
        own = items[j::3]
        assert order[:len(own)] == own, (t, order)
        assert order[len(own):] == [i for i in items if i not in own], (t, order)
    assert spread(items, ["remote"]) == [(i, "remote") for i in items]


def test_two_jobs_at_once_over_overlapping_fleets_fetch_each_layer_once(
    fleet: Fleet, registry: RegistryServer, registry_proxy: Proxy, tier: S3Tier,
    tmp_path: Path,
) -> None:
    images, layers = image_fleet(1300, 6)
    refs = push(registry, registry_proxy, images)
    files = [tmp_path / "one.txt", tmp_path / "two.txt"]
    files[0].write_text("\n".join(refs[:4]) + "\n")
    files[1].write_text("\n".join(refs[2:]) + "\n")

    procs = [
        subprocess.Popen(
            cli_cmd("submit", "-f", str(f)), env=fleet.env(), cwd=REPO_ROOT, text=True,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        for f in files
    ]
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    for out, _err in outs:
        assert re.fullmatch(r"\S+\n", out), f"submit without --wait must print the job id: {out!r}"
    ids = [out.strip() for out, _err in outs]
    assert ids[0] != ids[1]

    final = fleet.wait_done(*ids, timeout=120)
    registry_tiers: Counter[str] = Counter()
    for job_id, job_refs in zip(ids, (refs[:4], refs[2:]), strict=True):
        st = final[job_id]
        assert st["id"] == job_id
        assert st["state"] == "done", json.dumps(st, indent=1)[:3000]
        assert st["target"] == "remote"
        assert sorted(st["refs"]) == sorted(job_refs)
        job_layers = unique([lay for i in job_refs for lay in images[refs.index(i)].layers])
        assert set(by_digest(st)) == {lay.digest for lay in job_layers}
        for lay in job_layers:
            entry = by_digest(st)[lay.digest]
            assert_layer_done(entry, lay)
            registry_tiers[lay.digest] += entry["tier"] == "registry"
    stored = tier.objects()
    for lay in layers:
        assert registry_proxy.count("GET", f"/blobs/{lay.digest}") == 1, lay.digest
        assert registry_tiers[lay.digest] == 1, f"{lay.digest}: 'registry' tier in both jobs"
        assert stored.get(cache_name(lay)) == lay.tar
    assert_everything_intact(fleet, tier)


def test_permanent_error_fails_that_layer_only(
    fleet: Fleet, registry: RegistryServer, registry_proxy: Proxy, tier: S3Tier
) -> None:
    good1, good2 = layer(1400, "gzip"), layer(1401, "zstd")
    lying = layer(1402, "zstd", 150_000, override_diff_id="sha256:" + "0" * 64)
    refs = push(registry, registry_proxy, [Image([good1, lying]), Image([good2])])

    started = time.monotonic()
    p, status = submit_json(fleet, *refs)
    assert p.returncode == 1, f"{p.stderr[-3000:]}\n{fleet.logs()}"
    assert time.monotonic() - started < 60, "a permanent error must not be retried for long"
    assert status["state"] == "failed"
    entries_ = by_digest(status)
    bad = entries_[lying.digest]
    assert bad["state"] == "failed"
    assert lying.diff_id in bad["reason"], bad["reason"]
    assert "sha256:" + "0" * 64 in bad["reason"], bad["reason"]
    for lay in (good1, good2):
        assert_layer_done(entries_[lay.digest], lay)
    totals = status["totals"]
    assert (totals["layers"], totals["done"], totals["failed"]) == (3, 2, 1)
    assert registry_proxy.count("GET", f"/blobs/{lying.digest}") == 1, "permanent: no retry"
    assert all(cache_name(lying) not in names for names in fleet.entries().values())
    assert cache_name(lying) not in tier.objects()
    assert_everything_intact(fleet, tier)


def test_a_long_stage_reports_celery_progress_state(
    fleet: Fleet, registry: RegistryServer, redis_url: str
) -> None:
    """Flower shows a running task's Celery state: PROGRESS with the layer's bytes."""
    import redis

    big = layer(1300, "none", 4_000_000)
    with ThrottledProxy(registry.url) as proxy:
        refs = push(registry, proxy, [Image([big])])
        # At 2 MB/s the fetch runs a second or more before the hold: longer than the
        # interval between progress writes, so it reports bytes as Celery state. The hold
        # keeps the task running (and its state PROGRESS) until the test has seen it.
        proxy.throttle_path(f"/blobs/{big.digest}", 2_000_000)
        hold = proxy.hold(f"/blobs/{big.digest}", HELD)
        job_id = fleet.submit_id(*refs, "--to", "node:a")
        hold.wait(timeout=120)
        backend = redis.Redis.from_url(broker_url_for(redis_url, FLEET_DB))
        seen, deadline = None, time.monotonic() + 60
        while seen is None and time.monotonic() < deadline:
            for key in backend.scan_iter("celery-task-meta-*"):
                meta = json.loads(backend.get(key) or b"{}")
                result = meta.get("result") or {}
                if meta.get("status") == "PROGRESS" and result.get("digest") == big.digest:
                    seen = result
            time.sleep(0.2)
        hold.release()
        proxy.unthrottle()
        assert seen is not None, "no task reported PROGRESS for the held layer"
        assert seen["stage"] == "fetching" and seen["host"] == "a"
        assert 0 < seen["done"] <= big.size - HELD, seen
        assert seen["total"] == big.size
        assert fleet.wait_done(job_id)[job_id]["state"] == "done"
    assert (fleet.cache_dir("a") / cache_name(big)).read_bytes() == big.tar


def test_nodes_lists_every_live_host(fleet: Fleet) -> None:
    p = fleet.run("nodes", timeout=60)
    assert p.returncode == 0, p.stderr
    assert sorted(p.stdout.split()) == sorted(NODES), p.stdout
    assert len(p.stdout.splitlines()) == len(NODES), "one node name a line"
    p = fleet.run("nodes", "--json", timeout=60)
    assert p.returncode == 0, p.stderr
    assert sorted(json.loads(p.stdout)) == sorted(NODES)


def test_nodes_are_the_claimed_hosts_that_answer(fleet: Fleet) -> None:
    """The hosts asked are those holding a node claim; a claim whose host does not answer
    (a hung host, until its claim lapses) is not a live node."""
    import redis

    client = redis.Redis.from_url(fleet.broker_url)
    client.set("layerwarm:node:ghost", json.dumps({"host": "elsewhere", "pid": 1}), ex=60)
    try:
        p = fleet.run("nodes", "--json", timeout=60)
        assert p.returncode == 0, p.stderr
        assert sorted(json.loads(p.stdout)) == sorted(NODES), p.stdout
    finally:
        client.delete("layerwarm:node:ghost")


def test_status_of_unknown_job_is_one_clear_line(fleet: Fleet) -> None:
    job_id = f"nonexistent-{uuid.uuid4().hex}"
    for extra in ([], ["--json"]):
        p = fleet.run("status", job_id, *extra, timeout=60)
        assert p.returncode == 1, (p.stdout, p.stderr)
        lines = [x for x in p.stderr.splitlines() if x.strip()]
        assert len(lines) == 1, p.stderr
        assert "no job" in lines[0] and job_id in lines[0], lines[0]
        assert p.stdout == ""


@pytest.mark.parametrize("module", ["workers.cli", "pipeline.cli"])
def test_one_machine_warm_needs_no_broker(
    module: str, registry: RegistryServer, registry_proxy: Proxy, cache_dir: Path
) -> None:
    lay = layer(1500, "zstd")
    refs = push(registry, registry_proxy, [Image([lay])])
    env = {"LAYERWARM_BROKER_URL": "redis://127.0.0.1:1/0"}
    started = time.monotonic()
    if module == "pipeline.cli":
        p = run_layerwarm("warm", *refs, cache_dir=cache_dir, env=env, timeout=60)
    else:
        from tests.support.cli import layerwarm_env

        p = subprocess.run(
            cli_cmd("warm", *refs), env=layerwarm_env(cache_dir, env), cwd=REPO_ROOT,
            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
        )
    assert p.returncode == 0, p.stderr
    assert time.monotonic() - started < 30, "warm waited on the unreachable broker"
    assert entries(cache_dir) == {cache_name(lay)}
    assert (cache_dir / cache_name(lay)).read_bytes() == lay.tar
    assert "Traceback" not in p.stderr


def test_kill_9_of_the_fetching_worker_loses_nothing(
    tmp_path: Path, redis_url: str, registry: RegistryServer, s3: S3Server
) -> None:
    own = S3Tier.new(s3, "kill")
    big = layer(1600, "zstd", 8_000_000)
    small1, small2 = layer(1601, "gzip"), layer(1602, "none")
    with Proxy(registry.url) as proxy:
        refs = push(registry, proxy, [Image([small1, big, small2])])
        # The proxy holds the big blob's last bytes until the test releases them: the fetch
        # is mid-way when its worker is killed, however busy the machine is.
        hold = proxy.hold(f"/blobs/{big.digest}", HELD)
        with running_fleet(tmp_path / "fleet", NODES, broker_url_for(redis_url, KILL_DB), own,
                           s3.env(), visibility_timeout=VISIBILITY_TIMEOUT) as fleet:
            job_id = fleet.submit_id(*refs, "--to", "remote")
            hold.wait(timeout=120)
            entry = wait_layer(fleet, job_id, big.digest, ["fetching"], allowed=["pending"])
            victim = node_of(fleet, entry["host"])
            killed = fleet.kill9(victim)
            killed_at = time.monotonic()
            hold.release()
            assert killed, "nothing was killed"

            status = fleet.wait_done(job_id, timeout=150)[job_id]
            recovered_in = time.monotonic() - killed_at
            assert status["state"] == "done", json.dumps(status, indent=1)[:3000]
            for lay in (small1, big, small2):
                assert_layer_done(by_digest(status)[lay.digest], lay)
            assert status["totals"]["failed"] == 0
            stored = own.objects()
            for lay in (small1, big, small2):
                assert stored.get(cache_name(lay)) == lay.tar, f"{cache_name(lay)} not so in S3"
            assert any(cache_name(big) in names for names in fleet.entries().values())
            assert_everything_intact(fleet, own)
            assert proxy.count("GET", f"/blobs/{big.digest}") >= 2, (
                "the big blob was served once: the kill did not interrupt its fetch"
            )
            # A host whose IO worker is dead is no live host.
            live = json.loads(fleet.run("nodes", "--json", timeout=60).stdout)
            assert victim not in live and set(live) == set(NODES) - {victim}, live
            # The lost task comes back about when the visibility timeout says, not minutes
            # later (kombu only sweeps for expired unacked messages every so often).
            assert recovered_in < VISIBILITY_TIMEOUT + 40, (
                f"the job took {recovered_in:.0f}s after the kill to finish, with a "
                f"visibility timeout of {VISIBILITY_TIMEOUT}s: the killed task was redelivered late"
            )
