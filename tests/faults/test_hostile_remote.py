"""A hostile remote tier: what is stored under a layer's name is not trusted to be it.

A `file://` tier's entry or sidecar that is a symlink, a FIFO, or too big is refused (a miss,
one warning line naming it) and replaced by the verified layer; the tier's own directories
planted as links are never written through. An object whose metadata disagrees with the
layer, or that cannot fit on the cache's disk, is a miss: the registry serves the layer. A
fleet-target hit checks the object's metadata before calling the layer done.

Each test runs the real CLI (or a real worker fleet) and checks what a user would: the exit
code, the one line, the bytes in the cache and the tier, `layerwarm verify` clean, and the
victim file outside the tier untouched.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults import test_disk_faults
from tests.support.cli import entries, leftovers, run_layerwarm
from tests.support.fleet import Fleet, broker_url_for, push, running_fleet
from tests.support.fleetcheck import S3Tier, cache_name
from tests.support.hostile_remote import (
    Victim,
    get_object,
    lines_naming,
    metadata_for,
    plant_file,
    put_object,
    read_tier,
    run_capped,
    sidecar_bytes,
)
from tests.support.images import Image, Layer, random_tar
from tests.support.proxy import Proxy
from tests.support.registry import RegistryServer
from tests.support.s3 import S3Server

FLEET_DB = 14  # this module's fleet (flushed when it starts)
# A normal run takes a few seconds: a run still going after this is a hang (a FIFO opened).
HANG = 45.0


def _image(registry: RegistryServer, proxy: Proxy, seed: int) -> tuple[Layer, str]:
    lay = Layer(random_tar(seed, 200_000), "gzip")
    repo = f"remote/{uuid.uuid4().hex[:10]}"
    registry.push_image(repo, "1", Image([lay]))
    return lay, f"{proxy.host}/{repo}:1"


def _warm(ref: str, url: str, cache_dir: Path,
          env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return run_capped("warm", "--json", "--remote", url, ref, cache_dir=cache_dir,
                          env=env, timeout=HANG)
    except subprocess.TimeoutExpired:
        pytest.fail(f"warm --remote {url} did not finish in {HANG:.0f}s (a hang)",
                    pytrace=False)


def _from_registry(p: subprocess.CompletedProcess[str], lay: Layer, cache_dir: Path,
                   proxy: Proxy) -> None:
    """The warm went well, from the registry, and the cache holds the layer's bytes."""
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr, p.stderr
    [x] = json.loads(p.stdout)["layers"]
    assert x["source"] == "registry", x
    assert proxy.count("GET", f"/blobs/{lay.digest}") == 1
    assert (cache_dir / cache_name(lay)).read_bytes() == lay.tar
    assert leftovers(cache_dir) == []


def _one_warning(stderr: str, what: str, says: str) -> None:
    """Exactly one stderr line names `what`: a warning that says `says`."""
    named = lines_naming(stderr, what)
    assert len(named) == 1, f"want one line naming {what}, got {named}\n{stderr}"
    assert " WARNING " in named[0] and says in named[0], named[0]


def _verify_clean(cache_dir: Path, env: dict[str, str] | None = None,
                  *extra: str) -> None:
    p = run_layerwarm("verify", *extra, cache_dir=cache_dir, env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    assert not [x for x in p.stdout.splitlines() if x.startswith("bad")], p.stdout


# -- a file:// tier: entries and sidecars that are not regular files ----------------------


@pytest.mark.parametrize("kind", ["link-to-private", "link-to-dev-zero", "fifo"])
def test_a_file_tier_entry_that_is_not_a_regular_file_is_refused(
    registry: RegistryServer, registry_proxy: Proxy, tmp_path: Path, kind: str,
) -> None:
    lay, ref = _image(registry, registry_proxy, 7100)
    shared, cache_dir = tmp_path / "shared", tmp_path / "cache"
    victim = Victim.make(tmp_path / "outside", "secret", b"root only\n" * 1000)
    entry = shared / cache_name(lay)
    if kind == "fifo":
        plant_file(entry, "fifo")
    else:
        plant_file(entry, "link", target=victim.path if kind == "link-to-private"
                   else Path("/dev/zero"))
    # Its sidecar vouches for it with the layer's own metadata.
    plant_file(shared / ".meta" / f"{cache_name(lay)}.json", "file",
               data=sidecar_bytes(metadata_for(lay, len(victim.data))))

    p = _warm(ref, shared.as_uri(), cache_dir)
    _from_registry(p, lay, cache_dir, registry_proxy)
    _one_warning(p.stderr, str(entry), "not a regular file")
    assert victim.untouched()
    assert read_tier(shared, lay) == (lay.tar, metadata_for(lay)), "the planted entry is replaced"
    _verify_clean(cache_dir, None, "--remote", shared.as_uri())


@pytest.mark.parametrize("kind", ["link-to-private", "link-to-dev-zero", "fifo", "oversized"])
def test_a_file_tier_sidecar_that_is_not_a_small_regular_file_is_refused(
    registry: RegistryServer, registry_proxy: Proxy, tmp_path: Path, kind: str,
) -> None:
    """The entry holds the right bytes: only its sidecar is hostile. /dev/zero must not be
    read whole (the run is capped at 2 GiB), a FIFO must not be waited on."""
    lay, ref = _image(registry, registry_proxy, 7200)
    shared, cache_dir = tmp_path / "shared", tmp_path / "cache"
    honest = sidecar_bytes(metadata_for(lay))
    victim = Victim.make(tmp_path / "outside", "private.json", honest)
    plant_file(shared / cache_name(lay), "file", data=lay.tar)
    sidecar = shared / ".meta" / f"{cache_name(lay)}.json"
    if kind == "link-to-private":
        plant_file(sidecar, "link", target=victim.path)
    elif kind == "link-to-dev-zero":
        plant_file(sidecar, "link", target=Path("/dev/zero"))
    elif kind == "fifo":
        plant_file(sidecar, "fifo")
    else:  # valid JSON, the right metadata, but no sidecar of ours is 100 KiB
        plant_file(sidecar, "file", data=sidecar_bytes(metadata_for(lay), pad=100 << 10))

    p = _warm(ref, shared.as_uri(), cache_dir)
    _from_registry(p, lay, cache_dir, registry_proxy)
    says = "bytes" if kind == "oversized" else "not a regular file"
    _one_warning(p.stderr, str(sidecar), says)
    assert victim.untouched()
    assert read_tier(shared, lay) == (lay.tar, metadata_for(lay))
    _verify_clean(cache_dir, None, "--remote", shared.as_uri())


def test_a_file_tier_whose_directories_are_links_is_not_written_through(
    registry: RegistryServer, registry_proxy: Proxy, tmp_path: Path,
) -> None:
    """`.tmp` and `.meta` planted as links to a directory outside the tier: the publish
    refuses to write through them (one line naming one), the layer is warm on disk."""
    lay, ref = _image(registry, registry_proxy, 7300)
    shared, cache_dir = tmp_path / "shared", tmp_path / "cache"
    elsewhere = tmp_path / "elsewhere"
    victim = Victim.make(elsewhere, "keep", b"x" * 100)
    shared.mkdir()
    for sub in (".tmp", ".meta"):
        os.symlink(elsewhere, shared / sub)

    p = run_layerwarm("warm", "--remote", shared.as_uri(), ref, cache_dir=cache_dir)
    assert p.returncode == 1, p.stderr
    assert "Traceback" not in p.stderr, p.stderr
    errors = [x for x in p.stderr.splitlines() if x.startswith("error: ")]
    assert len(errors) == 1 and f"error: layer {lay.digest}: " in errors[0], p.stderr
    assert "not a directory" in errors[0] and str(shared / ".tmp") in errors[0], errors
    assert sorted(os.listdir(elsewhere)) == ["keep"] and victim.untouched()
    assert not (shared / cache_name(lay)).exists()
    assert (cache_dir / cache_name(lay)).read_bytes() == lay.tar
    _verify_clean(cache_dir)


# -- restore: no more than the layer, and only if it fits ---------------------------------


small_fs = test_disk_faults.small_fs  # the 4 MiB tmpfs: a real ENOSPC
GARBAGE = 8_000_000  # bytes: twice what the small disk holds


@pytest.mark.parametrize("claims", ["its-own-size", "the-layer-size"])
def test_a_remote_object_too_big_for_the_disk_falls_back_to_the_registry(
    registry: RegistryServer, registry_proxy: Proxy, s3: S3Server, small_fs: Path,
    claims: str,
) -> None:
    """8 MB of garbage under the layer's name, its metadata naming the layer's diff_id and
    either its own size (it cannot fit: free space is checked first) or the layer's (it
    disagrees with the object's size: not this layer)."""
    lay, ref = _image(registry, registry_proxy, 7400)
    bucket = s3.create_bucket(f"big-{uuid.uuid4().hex[:8]}")
    url, key = f"s3://{bucket}/p", f"p/{cache_name(lay)}"
    forged = metadata_for(lay, GARBAGE if claims == "its-own-size" else None)
    put_object(s3.client(), bucket, key, random.Random(7401).randbytes(GARBAGE), forged)
    cache_dir = small_fs / "cache"

    p = _warm(ref, url, cache_dir, s3.env())
    _from_registry(p, lay, cache_dir, registry_proxy)
    says = "no space left" if claims == "its-own-size" else "uncompressed-size"
    _one_warning(p.stderr, f"{url}/{cache_name(lay)}", says)
    assert get_object(s3.client(), bucket, key) == (lay.tar, metadata_for(lay)), \
        "the bad object is replaced by the verified layer"
    _verify_clean(cache_dir, s3.env(), "--remote", url)


def test_a_fetch_checks_free_space_before_downloading(
    registry: RegistryServer, registry_proxy: Proxy, small_fs: Path,
) -> None:
    big = Layer(random_tar(7500, 6_000_000), "none")  # a 6 MB blob on a 4 MiB disk
    repo = f"remote/{uuid.uuid4().hex[:10]}"
    registry.push_image(repo, "1", Image([big]))
    cache_dir = small_fs / "cache"

    p = run_layerwarm("warm", f"{registry_proxy.host}/{repo}:1", cache_dir=cache_dir)
    assert p.returncode == 1, p.stderr
    [error] = [x for x in p.stderr.splitlines() if x.startswith("error: ")]
    assert error.startswith(f"error: layer {big.digest}: no space left on {cache_dir}"), error
    assert str(big.size) in error, error
    assert registry_proxy.count("GET", f"/blobs/{big.digest}") == 0, "nothing downloaded"
    assert entries(cache_dir) == set() and leftovers(cache_dir) == []


# -- the fleet's target: the remote tier itself --------------------------------------------


@pytest.fixture(scope="module")
def fleet_tier(tmp_path_factory: pytest.TempPathFactory, redis_url: str,
               s3: S3Server) -> Iterator[tuple[Fleet, S3Tier]]:
    """One node, "a", with a bucket of its own as the shared tier."""
    tier = S3Tier.new(s3, "hostile")
    root = tmp_path_factory.mktemp("hostile-remote")
    with running_fleet(root, ["a"], broker_url_for(redis_url, FLEET_DB), tier, s3.env()) as f:
        yield f, tier


@pytest.mark.parametrize("metadata", ["none", "diff-id-only", "wrong-compressed-size"])
def test_a_fleet_target_hit_checks_the_object_before_calling_it_done(
    fleet_tier: tuple[Fleet, S3Tier], registry: RegistryServer, registry_proxy: Proxy,
    metadata: str,
) -> None:
    """4 KiB of random bytes under the layer's name: `submit --to remote` must not say
    "done from remote"; the verified layer replaces them. (With no metadata at all it
    was a miss already; the forged diff-id was taken as the layer.)"""
    fleet, tier = fleet_tier
    lay = Layer(random_tar(7600 + len(metadata), 300_000), "gzip")
    [ref] = push(registry, registry_proxy, [Image([lay])])
    forged = {"none": {}, "diff-id-only": {"diff-id": lay.diff_id},
              "wrong-compressed-size": {**metadata_for(lay, 4096), "compressed-size": "4096"}}
    key = f"{tier.prefix}/{cache_name(lay)}"
    put_object(tier.s3.client(), tier.bucket, key, random.Random(7600).randbytes(4096),
               forged[metadata])

    p = fleet.submit(ref, "--to", "remote", "--wait", "--json", timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "Traceback" not in p.stderr, p.stderr
    [x] = json.loads(p.stdout)["layers"]
    assert x["state"] == "done" and x["tier"] == "registry", x
    assert registry_proxy.count("GET", f"/blobs/{lay.digest}") == 1
    assert get_object(tier.s3.client(), tier.bucket, key) == (lay.tar, metadata_for(lay))
    _verify_clean(fleet.client_cache, tier.s3.env(), "--remote", tier.url)


def test_verify_remote_removes_an_entry_whose_sidecar_is_a_link(
    registry: RegistryServer, registry_proxy: Proxy, tmp_path: Path,
) -> None:
    """`verify --remote` reports the refused entry bad and removes it: the link, never
    the private file it points to."""
    lay, _ = _image(registry, registry_proxy, 7700)
    shared, cache_dir = tmp_path / "shared", tmp_path / "cache"
    victim = Victim.make(tmp_path / "outside", "private.json", sidecar_bytes(metadata_for(lay)))
    plant_file(shared / cache_name(lay), "file", data=lay.tar)
    sidecar = shared / ".meta" / f"{cache_name(lay)}.json"
    plant_file(sidecar, "link", target=victim.path)

    p = run_layerwarm("verify", "--remote", shared.as_uri(), cache_dir=cache_dir)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "Traceback" not in p.stderr, p.stderr
    [line] = [x for x in p.stdout.splitlines() if x.startswith("bad")]
    assert lay.digest in line and "symbolic link" in line and "(removed)" in line, line
    assert not os.path.lexists(shared / cache_name(lay)) and not os.path.lexists(sidecar)
    assert victim.untouched()
    _verify_clean(cache_dir, None, "--remote", shared.as_uri())
