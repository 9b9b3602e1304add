"""The remote tier end to end: a registry fetch fills both tiers; a wiped disk refills
from the remote tier without a single registry blob request. Run against a real S3
server over HTTP and against a shared directory."""

from __future__ import annotations

import json
import resource
import shutil
import uuid
from pathlib import Path

import pytest

from pipeline.digest import Digest
from pipeline.fileindex import LayerIndex
from tests.support.cli import entries, run_layerwarm
from tests.support.faults import S3Proxy
from tests.support.images import Image, Layer, random_tar
from tests.support.pagecache import resident
from tests.support.proxy import Proxy
from tests.support.registry import RegistryServer
from tests.support.s3 import S3Server


@pytest.fixture(params=["s3", "dir"])
def remote(request: pytest.FixtureRequest, tmp_path: Path):
    """(url, env, list_entries) for a fresh remote tier of each kind."""
    if request.param == "s3":
        s3: S3Server = request.getfixturevalue("s3")
        bucket = s3.create_bucket(f"layers-{uuid.uuid4().hex[:8]}")

        def objects() -> dict[str, dict]:
            client = s3.client()
            out = {}
            for obj in client.list_objects_v2(Bucket=bucket).get("Contents", []):
                head = client.head_object(Bucket=bucket, Key=obj["Key"])
                body = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
                out[obj["Key"]] = {"metadata": head["Metadata"], "body": body}
            return out

        return f"s3://{bucket}/prod", s3.env(), objects, "prod/"
    root = tmp_path / "shared"

    def files() -> dict[str, dict]:
        out = {}
        for p in sorted(root.glob("sha256_*")):
            meta = json.loads((root / ".meta" / f"{p.name}.json").read_text())
            out[p.name] = {"metadata": meta, "body": p.read_bytes()}
            index = root / ".index" / p.name  # named as S3 names it: `<name>.index`
            if index.exists():
                out[p.name + ".index"] = {"metadata": {}, "body": index.read_bytes()}
        return out

    return f"file://{root}", {}, files, ""


def test_registry_fetch_fills_both_tiers_and_remote_refills_disk(
    registry: RegistryServer, registry_proxy: Proxy, tmp_path: Path, remote
) -> None:
    url, env, objects, prefix = remote
    layers = [
        Layer(random_tar(70, 300_000), "gzip"),
        Layer(random_tar(71, 200_000), "zstd"),
        Layer(random_tar(72, 100_000), "none"),
    ]
    r = f"t/{uuid.uuid4().hex[:10]}"
    registry.push_image(r, "1", Image(layers))
    ref = f"{registry_proxy.host}/{r}:1"
    cache_dir = tmp_path / "cache"

    p = run_layerwarm("warm", "--remote", url, ref, cache_dir=cache_dir, env=env)
    assert p.returncode == 0, p.stderr
    stored = objects()
    for lay in layers:
        key = prefix + "sha256_" + lay.digest.removeprefix("sha256:")
        assert stored[key]["body"] == lay.tar
        meta = stored[key]["metadata"]
        assert meta["diff-id"] == lay.diff_id
        assert meta["media-type"] == lay.media_type
        assert meta["compressed-size"] == str(lay.size)
        assert meta["uncompressed-size"] == str(len(lay.tar))
    # Each layer, and beside it its file index (pipeline/fileindex.py), for that tar.
    assert len(stored) == 6, sorted(stored)
    for lay in layers:
        key = prefix + "sha256_" + lay.digest.removeprefix("sha256:")
        index = LayerIndex.loads(stored[key + ".index"]["body"], expect=Digest.parse(lay.diff_id))
        assert index.tar_size == len(lay.tar)
    assert p.stderr.count("layer published to remote") == 3

    shutil.rmtree(cache_dir)
    registry_proxy.reset()
    p = run_layerwarm("warm", "--json", "--remote", url, ref, cache_dir=cache_dir, env=env)
    assert p.returncode == 0, p.stderr
    for lay in layers:
        assert registry_proxy.count("GET", f"/blobs/{lay.digest}") == 0
        name = "sha256_" + lay.digest.removeprefix("sha256:")
        assert (cache_dir / name).read_bytes() == lay.tar
    result = json.loads(p.stdout)
    assert {x["source"] for x in result["layers"]} == {"remote"}
    assert result["totals"]["bytes_from_remote"] == sum(len(x.tar) for x in layers)
    assert p.stderr.count("remote cache hit") == 3

    # A disk hit touches nothing remote: the remote tier may even be gone.
    p = run_layerwarm(
        "warm", "--remote", "s3://no-such-bucket-anywhere/x", ref, cache_dir=cache_dir,
        env={**env, "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9"},
    )
    assert p.returncode == 0, p.stderr
    assert p.stderr.count("disk cache hit") == 3


def test_corrupt_remote_entry_is_not_trusted(
    registry: RegistryServer, registry_proxy: Proxy, tmp_path: Path
) -> None:
    lay = Layer(random_tar(73, 150_000), "gzip")
    r = f"t/{uuid.uuid4().hex[:10]}"
    registry.push_image(r, "1", Image([lay]))
    ref = f"{registry_proxy.host}/{r}:1"
    shared = tmp_path / "shared"
    cache_dir = tmp_path / "cache"
    p = run_layerwarm("warm", "--remote", f"file://{shared}", ref, cache_dir=cache_dir)
    assert p.returncode == 0, p.stderr

    name = "sha256_" + lay.digest.removeprefix("sha256:")
    corrupted = bytearray((shared / name).read_bytes())
    corrupted[500] ^= 0xFF
    (shared / name).write_bytes(bytes(corrupted))
    shutil.rmtree(cache_dir)
    registry_proxy.reset()

    p = run_layerwarm("warm", "--remote", f"file://{shared}", ref, cache_dir=cache_dir)
    assert p.returncode == 0, p.stderr
    assert "remote entry is corrupt" in p.stderr
    assert registry_proxy.count("GET", f"/blobs/{lay.digest}") == 1
    assert (cache_dir / name).read_bytes() == lay.tar
    assert (shared / name).read_bytes() == lay.tar, "the bad remote copy is replaced"


def test_unreachable_remote_still_warms_and_publishes_later(
    registry: RegistryServer, registry_proxy: Proxy, s3: S3Server, tmp_path: Path
) -> None:
    lay = Layer(random_tar(74, 100_000), "zstd")
    r = f"t/{uuid.uuid4().hex[:10]}"
    registry.push_image(r, "1", Image([lay]))
    ref = f"{registry_proxy.host}/{r}:1"
    cache_dir = tmp_path / "cache"
    bucket = s3.create_bucket(f"later-{uuid.uuid4().hex[:8]}")
    down = {**s3.env(), "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9"}
    p = run_layerwarm("warm", "--remote", f"s3://{bucket}/x", ref, cache_dir=cache_dir, env=down)
    assert p.returncode == 0, p.stderr
    name = "sha256_" + lay.digest.removeprefix("sha256:")
    assert entries(cache_dir) == {name}
    assert "remote tier unavailable" in p.stderr

    # The shared tier is back: the next warm is a disk hit that still owes a publish.
    registry_proxy.reset()
    p = run_layerwarm("warm", "--remote", f"s3://{bucket}/x", ref, cache_dir=cache_dir,
                      env=s3.env())
    assert p.returncode == 0, p.stderr
    assert "disk cache hit" in p.stderr and "layer published to remote" in p.stderr
    assert registry_proxy.count("GET", f"/blobs/{lay.digest}") == 0
    body = s3.client().get_object(Bucket=bucket, Key=f"x/{name}")["Body"].read()
    assert body == lay.tar

    # Owed nothing any more: a third warm touches nothing remote.
    p = run_layerwarm("warm", "--remote", f"s3://{bucket}/x", ref, cache_dir=cache_dir, env=down)
    assert p.returncode == 0, p.stderr
    assert "remote tier unavailable" not in p.stderr and "publish" not in p.stderr


def test_a_remote_tier_refusing_the_read_falls_back_to_the_registry(
    registry: RegistryServer, registry_proxy: Proxy, s3: S3Server, tmp_path: Path
) -> None:
    """A restore the store refuses (403 on the GET, the HEAD allowed) is a failed restore:
    the layer comes from the registry, with one warning, and nothing is published over the
    object the store would not let us read."""
    lay = Layer(random_tar(76, 120_000), "gzip")
    r = f"t/{uuid.uuid4().hex[:10]}"
    registry.push_image(r, "1", Image([lay]))
    ref = f"{registry_proxy.host}/{r}:1"
    cache_dir = tmp_path / "cache"
    bucket = s3.create_bucket(f"refuse-{uuid.uuid4().hex[:8]}")
    name = "sha256_" + lay.digest.removeprefix("sha256:")
    with S3Proxy(s3.url) as store:
        env = store.env(s3.env())
        p = run_layerwarm("warm", "--remote", f"s3://{bucket}/x", ref, cache_dir=cache_dir, env=env)
        assert p.returncode == 0, p.stderr
        shutil.rmtree(cache_dir)
        registry_proxy.reset()
        store.fail(f"/{name}", 403, times=None, method="GET")
        puts = store.count("PUT", f"/{name}")
        p = run_layerwarm("warm", "--remote", f"s3://{bucket}/x", ref, cache_dir=cache_dir, env=env)
        assert p.returncode == 0, p.stderr
        warnings = [x for x in p.stderr.splitlines() if "WARNING" in x and "registry" in x]
        assert len(warnings) == 1 and "access denied" in warnings[0], p.stderr
        assert "Traceback" not in p.stderr
        assert store.count("PUT", f"/{name}") == puts, "nothing published over it"
    assert registry_proxy.count("GET", f"/blobs/{lay.digest}") == 1
    assert (cache_dir / name).read_bytes() == lay.tar


def test_entries_from_the_registry_and_from_the_remote_are_left_out_of_the_page_cache(
    registry: RegistryServer, tmp_path: Path, remote
) -> None:
    """A layer of several MiB is left out of the page cache (pipeline/writebehind.py) both
    when decompressed from its blob and when restored from the remote tier: the node's
    hot pages stay where they are. The bytes are the layer's all the same."""
    url, env, _objects, _prefix = remote
    lay = Layer(random_tar(73, 6_000_000), "gzip")
    r = f"t/{uuid.uuid4().hex[:10]}"
    registry.push_image(r, "1", Image([lay]))
    ref = f"{registry.host}/{r}:1"
    cache_dir = tmp_path / "cache"
    entry = cache_dir / ("sha256_" + lay.digest.removeprefix("sha256:"))

    p = run_layerwarm("warm", ref, cache_dir=cache_dir, env=env)  # decompressed here
    assert p.returncode == 0, p.stderr
    assert resident(entry) <= 4096, "the decompressed entry is in the page cache"
    assert entry.read_bytes() == lay.tar
    shutil.rmtree(cache_dir)
    # With the remote tier: publishing reads the entry (into the cache); then restore it.
    for source in ("registry", "remote"):
        p = run_layerwarm("warm", "--json", "--remote", url, ref, cache_dir=cache_dir, env=env)
        assert p.returncode == 0, p.stderr
        assert [x["source"] for x in json.loads(p.stdout)["layers"]] == [source]
        if source == "registry":
            shutil.rmtree(cache_dir)
    assert resident(entry) <= 4096, "the restored entry is in the page cache"
    assert entry.read_bytes() == lay.tar


def test_a_fetched_layer_is_published_from_the_page_cache_then_left_out_of_it(
    registry: RegistryServer, tmp_path: Path, remote
) -> None:
    """With a remote tier, the decompress keeps the new entry's pages for the publish that
    reads it next (its file digests, then the upload): the warm reads nothing of it back
    from the disk. Once published, its pages leave the page cache."""
    url, env, objects, prefix = remote
    lay = Layer(random_tar(74, 24_000_000), "gzip")
    r = f"t/{uuid.uuid4().hex[:10]}"
    registry.push_image(r, "1", Image([lay]))
    cache_dir = tmp_path / "cache"
    name = "sha256_" + lay.digest.removeprefix("sha256:")
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_inblock
    p = run_layerwarm("warm", "--json", "--remote", url, f"{registry.host}/{r}:1",
                      cache_dir=cache_dir, env=env)
    read_from_disk = (resource.getrusage(resource.RUSAGE_CHILDREN).ru_inblock - before) * 512
    assert p.returncode == 0, p.stderr
    assert [x["source"] for x in json.loads(p.stdout)["layers"]] == ["registry"]
    assert objects()[prefix + name]["body"] == lay.tar
    assert read_from_disk < len(lay.tar) // 2, \
        f"the warm read {read_from_disk} bytes from the disk: the publish read the entry back"
    assert resident(cache_dir / name) <= 4096, "the published entry is still in the page cache"
