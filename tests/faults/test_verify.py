"""No corrupt entry survives: `verify` re-hashes entries against their recorded diff_id,
and a warm that finds an entry of the wrong size fetches it again."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

from tests.support.cli import entries, run_layerwarm
from tests.support.images import Image, Layer, random_tar
from tests.support.proxy import Proxy
from tests.support.registry import RegistryServer
from tests.support.s3 import S3Server


def _name(lay: Layer) -> str:
    return "sha256_" + lay.digest.removeprefix("sha256:")


def _warm_image(registry: RegistryServer, host: str, cache_dir: Path, *layers: Layer,
                env: dict | None = None, extra: tuple[str, ...] = ()) -> str:
    r = f"t/{uuid.uuid4().hex[:10]}"
    registry.push_image(r, "1", Image(list(layers)))
    ref = f"{host}/{r}:1"
    p = run_layerwarm("warm", *extra, ref, cache_dir=cache_dir, env=env)
    assert p.returncode == 0, p.stderr
    return ref


def _flip(path: Path, offset: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_verify_reports_then_removes_a_corrupt_entry(
    registry: RegistryServer, registry_proxy: Proxy, cache_dir: Path
) -> None:
    good, bad = Layer(random_tar(300, 200_000), "gzip"), Layer(random_tar(301, 200_000), "zstd")
    ref = _warm_image(registry, registry_proxy.host, cache_dir, good, bad)
    assert run_layerwarm("verify", cache_dir=cache_dir).returncode == 0
    _flip(cache_dir / _name(bad))

    p = run_layerwarm("verify", "--report", cache_dir=cache_dir)
    assert p.returncode == 1
    line = next(x for x in p.stdout.splitlines() if x.startswith("bad"))
    assert bad.digest in line and f"expected {bad.diff_id}" in line and "(removed)" not in line
    assert (cache_dir / _name(bad)).exists(), "--report removes nothing"
    assert "2 entries: 1 ok, 1 bad" in p.stdout

    p = run_layerwarm("verify", cache_dir=cache_dir)
    assert p.returncode == 1 and "(removed)" in p.stdout
    assert entries(cache_dir) == {_name(good)}

    registry_proxy.reset()
    p = run_layerwarm("warm", ref, cache_dir=cache_dir)
    assert p.returncode == 0, p.stderr
    assert registry_proxy.count("GET", f"/blobs/{bad.digest}") == 1
    assert registry_proxy.count("GET", f"/blobs/{good.digest}") == 0
    assert (cache_dir / _name(bad)).read_bytes() == bad.tar
    assert run_layerwarm("verify", _name(bad), cache_dir=cache_dir).returncode == 0


def test_warm_refetches_an_entry_of_the_wrong_size(
    registry: RegistryServer, registry_proxy: Proxy, cache_dir: Path
) -> None:
    lay = Layer(random_tar(302, 300_000), "gzip")
    ref = _warm_image(registry, registry_proxy.host, cache_dir, lay)
    path = cache_dir / _name(lay)
    path.write_bytes(path.read_bytes()[:1000])  # truncated behind layerwarm's back
    registry_proxy.reset()

    p = run_layerwarm("warm", ref, cache_dir=cache_dir)
    assert p.returncode == 0, p.stderr
    assert "1000 bytes" in p.stderr and "fetching it again" in p.stderr
    assert registry_proxy.count("GET", f"/blobs/{lay.digest}") == 1
    assert path.read_bytes() == lay.tar


def test_verify_remote_removes_a_corrupt_object(
    registry: RegistryServer, s3: S3Server, cache_dir: Path
) -> None:
    bucket = s3.create_bucket(f"verify-{uuid.uuid4().hex[:8]}")
    lay = Layer(random_tar(303, 150_000), "gzip")
    url = f"s3://{bucket}/p"
    _warm_image(registry, registry.host, cache_dir, lay, env=s3.env(), extra=("--remote", url))
    client = s3.client()
    key = f"p/{_name(lay)}"
    head = client.head_object(Bucket=bucket, Key=key)
    corrupt = bytearray(lay.tar)
    corrupt[10] ^= 1
    client.put_object(Bucket=bucket, Key=key, Body=bytes(corrupt), Metadata=head["Metadata"])

    p = run_layerwarm("verify", "--remote", url, cache_dir=cache_dir, env=s3.env())
    assert p.returncode == 1
    line = next(x for x in p.stdout.splitlines() if x.startswith("bad"))
    assert "remote" in line and lay.digest in line and "(removed)" in line
    assert "Contents" not in client.list_objects_v2(Bucket=bucket, Prefix="p/")
    assert (cache_dir / _name(lay)).read_bytes() == lay.tar  # the disk copy was fine


def test_entry_without_a_record_is_unverifiable_not_bad(
    registry: RegistryServer, cache_dir: Path, tmp_path: Path
) -> None:
    lay = Layer(random_tar(304, 100_000), "none")
    _warm_image(registry, registry.host, cache_dir, lay)
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(cache_dir / _name(lay), other / _name(lay))
    p = run_layerwarm("verify", cache_dir=other)
    assert p.returncode == 0
    assert "unverifiable" in p.stdout and "no recorded diff_id" in p.stdout
    assert (other / _name(lay)).exists()


def test_verify_refuses_malformed_digests(cache_dir: Path) -> None:
    for bad in ("sha256:../../etc/passwd", "sha256_" + "A" * 64, "latest"):
        p = run_layerwarm("verify", bad, cache_dir=cache_dir)
        assert p.returncode == 2, bad
        assert "invalid digest" in p.stderr
