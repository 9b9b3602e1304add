"""Sharing by content (issue 6, item 3): a layer whose diff_id is already on disk under
another digest becomes a hard link to that file, with no registry fetch and no second copy.

The same tar is pushed as a gzip layer and as a zstd layer (two digests, one diff_id) to
the real registry behind the counting proxy; what a user checks is the inode, the bytes,
the proxy's blob GETs, and what `warm`, `df`, `inspect`, `verify` and `rm` say.
"""

from __future__ import annotations

import errno
import json
import os
import uuid
from pathlib import Path

import pytest

from pipeline import sharing
from pipeline.digest import Digest, Verified, Verifier
from pipeline.layer import FromBlob, LayerSpec
from pipeline.tiers.disk import DiskTier
from tests.support.cli import entries, leftovers, run_layerwarm
from tests.support.images import Image, Layer, random_tar
from tests.support.proxy import Proxy
from tests.support.registry import RegistryServer


def _name(lay: Layer) -> str:
    return "sha256_" + lay.digest.removeprefix("sha256:")


def _json(*args: str, cache_dir: Path, env: dict[str, str] | None = None) -> dict:
    p = run_layerwarm(*args, "--json", cache_dir=cache_dir, env=env)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def _only(report: dict) -> dict:
    [layer] = report["layers"]
    return layer


def test_zstd_image_links_to_the_gzip_entry_without_a_fetch(
    registry: RegistryServer, registry_proxy: Proxy, cache_dir: Path, tmp_path: Path
) -> None:
    tar = random_tar(700, 250_000)
    gz, zs = Layer(tar, "gzip"), Layer(tar, "zstd")
    assert gz.digest != zs.digest and gz.diff_id == zs.diff_id
    repo = f"share/{uuid.uuid4().hex[:10]}"
    registry.push_image(repo, "gzip", Image([gz]))
    registry.push_image(repo, "zstd", Image([zs]))
    ref_gz, ref_zs = f"{registry_proxy.host}/{repo}:gzip", f"{registry_proxy.host}/{repo}:zstd"
    shared_dir = tmp_path / "shared"
    remote = {"LAYERWARM_REMOTE": shared_dir.as_uri()}

    assert _only(_json("warm", ref_gz, cache_dir=cache_dir, env=remote))["source"] == "registry"
    registry_proxy.reset()
    got = _only(_json("warm", ref_zs, cache_dir=cache_dir, env=remote))
    assert (got["digest"], got["source"], got["shared_from"]) == (zs.digest, "link", gz.digest)
    # Linked, not published: nothing proves the zstd blob is this tar but the image's
    # config, so the shared tier never gets it under the zstd digest.
    assert got["uncompressed_size"] == len(tar) and got["published"] is None
    assert registry_proxy.count("GET", f"/blobs/{zs.digest}") == 0, "no fetch for the zstd blob"
    # Not even the config: it is the gzip image's (same diff_ids), kept in .meta.db.
    assert registry_proxy.count("GET", "/blobs/") == 0, "a blob was fetched"

    # One file, two names on disk; only the gzip digest, fetched and verified, is shared.
    a, b = cache_dir / _name(gz), cache_dir / _name(zs)
    assert a.stat().st_ino == b.stat().st_ino and b.stat().st_nlink == 2
    assert a.read_bytes() == b.read_bytes() == tar
    assert (shared_dir / _name(gz)).read_bytes() == tar
    assert not (shared_dir / _name(zs)).exists()
    assert leftovers(cache_dir) == []

    # df: two names of one file, and two images each using one of them.
    df = _json("df", cache_dir=cache_dir)
    assert df["entries"] == 2 and df["bytes"] == 2 * len(tar)  # existing fields: per name
    assert df["stored_bytes"] == len(tar) and df["linked_entries"] == 2
    assert df["cross_compression_saved_bytes"] == len(tar)
    assert df["image_bytes"] == 2 * len(tar) and df["cross_image_saved_bytes"] == len(tar)
    p = run_layerwarm("df", cache_dir=cache_dir)
    assert p.returncode == 0, p.stderr
    links = next(x for x in p.stdout.splitlines() if x.startswith("saved by links "))
    assert f"({len(tar)} bytes)" in links
    assert "linked         2" in p.stdout and "entries        2" in p.stdout

    # inspect names the other digest; verify re-hashes both names and finds them good.
    assert _json("inspect", zs.digest, cache_dir=cache_dir)["shares_content_with"] == [gz.digest]
    p = run_layerwarm("inspect", gz.digest, cache_dir=cache_dir)
    assert f"shares with   {zs.digest} (same file, same diff_id)" in p.stdout
    p = run_layerwarm("verify", "--json", cache_dir=cache_dir)
    assert p.returncode == 0, p.stderr
    assert sorted((c["digest"], c["state"]) for c in json.loads(p.stdout)) == sorted(
        [(gz.digest, "ok"), (zs.digest, "ok")]
    )

    # rm of one name leaves the other whole; plan and warm then say it will be / was shared.
    assert run_layerwarm("rm", zs.digest, cache_dir=cache_dir).returncode == 0
    assert entries(cache_dir) == {_name(gz)} and a.read_bytes() == tar
    assert a.stat().st_nlink == 1
    plan = _json("plan", ref_zs, cache_dir=cache_dir)
    assert _only(plan)["tier"] == "link" and plan["bytes_to_fetch"] == 0
    registry_proxy.reset()
    p = run_layerwarm("warm", ref_zs, cache_dir=cache_dir)
    assert p.returncode == 0, p.stderr
    assert "disk (shared by diff_id)" in p.stdout
    assert "1 shared by diff_id (no fetch)" in p.stdout.splitlines()[-1]
    assert registry_proxy.count("GET", f"/blobs/{zs.digest}") == 0
    assert a.stat().st_ino == b.stat().st_ino

    # ... and the other way round: removing the first name keeps the linked one.
    assert run_layerwarm("rm", _name(gz), cache_dir=cache_dir).returncode == 0
    assert entries(cache_dir) == {_name(zs)} and b.read_bytes() == tar
    assert _only(_json("warm", ref_zs, cache_dir=cache_dir))["source"] == "disk"


def _source_entry(disk: DiskTier, lay: Layer) -> LayerSpec:
    """Put `lay` on disk as a verified entry with its row, as a warm would."""
    spec = _spec(lay)
    with disk.ingest(spec.digest) as ingest:
        ingest.file.write(lay.tar)
        ingest.commit(spec, _proof(lay.tar, spec.diff_id), FromBlob(_proof(lay.blob, spec.digest)))
    return spec


def _proof(data: bytes, digest: Digest) -> Verified:
    verifier = Verifier(digest)
    verifier.update(data)
    return verifier.verify()


def _spec(lay: Layer) -> LayerSpec:
    return LayerSpec(Digest.parse(lay.digest), Digest.parse(lay.diff_id), lay.media_type, lay.size)


def _no_links(monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError(code, os.strerror(code))

    def no_reflink(*args: object) -> None:
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))

    monkeypatch.setattr(sharing.os, "link", refuse)
    monkeypatch.setattr(sharing.fcntl, "ioctl", no_reflink)


@pytest.mark.parametrize("code", [errno.EXDEV, errno.EMLINK, errno.EPERM])
def test_where_links_are_refused_a_verified_copy_is_made(
    monkeypatch: pytest.MonkeyPatch, cache_dir: Path, code: int
) -> None:
    tar = random_tar(710, 120_000)
    disk = DiskTier(cache_dir)
    gz = _source_entry(disk, Layer(tar, "gzip"))
    zs = _spec(Layer(tar, "zstd"))
    _no_links(monkeypatch, code)
    with disk.lock(zs.digest):
        shared = sharing.share(zs, disk)
    assert shared == sharing.Linked(gz.digest, "copy", len(tar))
    a, b = disk.path(gz.digest), disk.path(zs.digest)
    assert b.read_bytes() == tar and a.stat().st_ino != b.stat().st_ino
    assert b.stat().st_nlink == 1
    row = disk.meta.layer(zs.digest)
    assert row is not None and (row.diff_id, row.uncompressed_size) == (zs.diff_id, len(tar))
    assert row.media_type == zs.media_type and row.compressed_size == zs.size
    assert list(disk.tmp_dir.iterdir()) == []


@pytest.mark.parametrize("how", ["hardlink", "copy"])
def test_a_corrupt_source_is_not_shared_and_is_dropped(
    monkeypatch: pytest.MonkeyPatch, cache_dir: Path, how: str
) -> None:
    tar = random_tar(720, 120_000)
    disk = DiskTier(cache_dir)
    gz = _source_entry(disk, Layer(tar, "gzip"))
    zs = _spec(Layer(tar, "zstd"))
    path = disk.path(gz.digest)
    data = bytearray(path.read_bytes())
    data[5000] ^= 0xFF  # same size: only hashing can tell
    path.write_bytes(bytes(data))
    if how == "copy":
        _no_links(monkeypatch, errno.EXDEV)
    with disk.lock(zs.digest):
        assert sharing.share(zs, disk) is None  # the caller fetches it instead
    assert not disk.has(zs.digest) and not disk.has(gz.digest)
    assert disk.meta.layer(gz.digest) is None and list(disk.tmp_dir.iterdir()) == []


def test_only_a_whole_entry_with_the_same_diff_id_is_shared(cache_dir: Path) -> None:
    disk = DiskTier(cache_dir)
    tar = random_tar(730, 80_000)
    gz = _source_entry(disk, Layer(tar, "gzip"))
    other = _spec(Layer(random_tar(731, 80_000), "zstd"))
    with disk.lock(other.digest):
        assert sharing.share(other, disk) is None  # another diff_id: nothing to share
    with open(disk.path(gz.digest), "ab") as f:  # grown behind our back: not as recorded
        f.write(b"x")
    zs = _spec(Layer(tar, "zstd"))
    with disk.lock(zs.digest):
        assert sharing.share(zs, disk) is None
    assert not disk.has(zs.digest) and not disk.has(other.digest)


def test_a_busy_source_is_not_waited_for_without_bound(cache_dir: Path) -> None:
    tar = random_tar(740, 60_000)
    disk = DiskTier(cache_dir)
    gz = _source_entry(disk, Layer(tar, "gzip"))
    zs = _spec(Layer(tar, "zstd"))
    busy = DiskTier(cache_dir).lock(gz.digest)  # another open file: flock contends with it
    busy.acquire()
    try:
        with disk.lock(zs.digest):
            assert sharing.share(zs, disk, wait=0.2) is None
    finally:
        busy.release()
    with disk.lock(zs.digest):
        shared = sharing.share(zs, disk)
    assert shared is not None and shared.how == "hardlink"
    assert disk.path(zs.digest).stat().st_ino == disk.path(gz.digest).stat().st_ino


def test_one_warm_of_both_images_fetches_the_content_once(
    registry: RegistryServer, registry_proxy: Proxy, cache_dir: Path
) -> None:
    tar = random_tar(750, 300_000)
    gz, zs = Layer(tar, "gzip"), Layer(tar, "zstd")
    repo = f"share/{uuid.uuid4().hex[:10]}"
    registry.push_image(repo, "gzip", Image([gz]))
    registry.push_image(repo, "zstd", Image([zs]))
    refs = [f"{registry_proxy.host}/{repo}:{tag}" for tag in ("gzip", "zstd")]

    report = _json("warm", *refs, cache_dir=cache_dir)
    # The two layers run side by side; whichever goes first fetches, the other links.
    assert sorted(x["source"] for x in report["layers"]) == ["link", "registry"]
    fetched = [registry_proxy.count("GET", f"/blobs/{x.digest}") for x in (gz, zs)]
    assert sorted(fetched) == [0, 1], fetched
    a, b = cache_dir / _name(gz), cache_dir / _name(zs)
    assert a.stat().st_ino == b.stat().st_ino and a.read_bytes() == tar
    assert report["totals"]["shared_by_diff_id"] == 1
