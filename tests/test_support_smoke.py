"""The test infrastructure itself works: builders, registry, proxy, S3."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path

import pytest
import requests
import zstandard

from tests.support.images import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    Dir,
    File,
    Hardlink,
    Image,
    Layer,
    Platform,
    Symlink,
    Whiteout,
    make_index,
    make_tar,
    random_tar,
    sha256_digest,
)
from tests.support.proxy import Proxy
from tests.support.registry import RegistryServer
from tests.support.s3 import S3Server

ENTRIES = [
    Dir("etc"),
    File("etc/hello.txt", b"hello\n"),
    File("bin/tool", b"#!/bin/sh\n", mode=0o755),
    Symlink("etc/link", "hello.txt"),
    Hardlink("etc/hard", "etc/hello.txt"),
    Whiteout("etc/gone"),
    Whiteout("var/cache", opaque=True),
]


def three_layer_image(fmt: str = "oci", platform: Platform | None = None) -> Image:
    layers = [
        Layer(make_tar(ENTRIES), "gzip"),
        Layer(random_tar(1, 20_000), "zstd"),
        Layer(random_tar(2, 5_000), "none"),
    ]
    return Image(layers, platform or Platform(), fmt)


def get_manifest(url: str, repo: str, ref: str, accept: str, **kw: object) -> requests.Response:
    return requests.get(f"{url}/v2/{repo}/manifests/{ref}", headers={"Accept": accept}, **kw)


def test_tar_builder_is_deterministic_and_complete() -> None:
    data = make_tar(ENTRIES)
    assert data == make_tar(ENTRIES)
    assert random_tar(7, 10_000) == random_tar(7, 10_000) != random_tar(8, 10_000)
    assert 10_000 <= len(random_tar(7, 10_000)) < 30_000
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert members["etc/link"].issym() and members["etc/link"].linkname == "hello.txt"
    assert members["etc/hard"].islnk() and members["etc/hard"].linkname == "etc/hello.txt"
    assert "etc/.wh.gone" in members and "var/cache/.wh..wh..opq" in members
    assert members["bin/tool"].mode == 0o755 and members["etc/hello.txt"].mtime > 0


def test_layer_blobs_and_media_types() -> None:
    tar = random_tar(3, 4_000)
    gz, zs, plain = (Layer(tar, c) for c in ("gzip", "zstd", "none"))
    assert gzip.decompress(gz.blob) == tar and plain.blob == tar
    params = zstandard.get_frame_parameters(zs.blob)
    assert params.content_size == zstandard.CONTENTSIZE_UNKNOWN
    assert zstandard.ZstdDecompressor().decompressobj().decompress(zs.blob) == tar
    assert gz.diff_id == zs.diff_id == sha256_digest(tar) and gz.digest == sha256_digest(gz.blob)
    assert gz.media_type == "application/vnd.oci.image.layer.v1.tar+gzip"
    assert gz.media_type_for("docker") == "application/vnd.docker.image.rootfs.diff.tar.gzip"
    assert zs.media_type_for("docker") == "application/vnd.oci.image.layer.v1.tar+zstd"
    assert plain.media_type_for("docker") == "application/vnd.docker.image.rootfs.diff.tar"
    hostile = Layer(tar, override_digest="sha256:../../x", override_media_type="x/unknown")
    assert hostile.descriptor() == {
        "mediaType": "x/unknown",
        "digest": "sha256:../../x",
        "size": hostile.size,
    }


def test_push_and_read_back_oci_image_and_index(registry: RegistryServer) -> None:
    image = three_layer_image()
    digest = registry.push_image("smoke/oci", "v1", image)
    assert digest == image.manifest_digest
    resp = get_manifest(registry.url, "smoke/oci", "v1", OCI_MANIFEST, timeout=10)
    assert resp.status_code == 200 and resp.content == image.manifest_bytes()
    assert resp.headers["Docker-Content-Digest"] == digest
    assert resp.headers["Content-Type"] == OCI_MANIFEST
    # Known registry behaviour (TESTING.md): no OCI Accept header, no OCI manifest.
    no_accept = requests.get(f"{registry.url}/v2/smoke/oci/manifests/v1", timeout=10)
    assert no_accept.status_code == 404
    config = json.loads(image.config_bytes())
    assert config["rootfs"] == {"type": "layers", "diff_ids": [x.diff_id for x in image.layers]}
    for layer in image.layers:
        blob = requests.get(f"{registry.url}/v2/smoke/oci/blobs/{layer.digest}", timeout=10)
        assert blob.content == layer.blob and sha256_digest(blob.content) == layer.digest

    arm = three_layer_image(platform=Platform("linux", "arm64", "v8"))
    index_digest = registry.push_index("smoke/oci", "multi", [image, arm])
    data, media_type, expected = make_index([image, arm])
    assert media_type == OCI_INDEX and index_digest == expected
    resp = get_manifest(registry.url, "smoke/oci", "multi", OCI_INDEX, timeout=10)
    assert resp.content == data
    platforms = [m["platform"] for m in resp.json()["manifests"]]
    assert platforms == [
        {"architecture": "amd64", "os": "linux"},
        {"architecture": "arm64", "os": "linux", "variant": "v8"},
    ]
    by_digest = get_manifest(registry.url, "smoke/oci", arm.manifest_digest, OCI_MANIFEST)
    assert by_digest.content == arm.manifest_bytes()


def test_push_docker_image_and_manifest_list(registry: RegistryServer) -> None:
    amd = three_layer_image("docker")
    arm = three_layer_image("docker", Platform("linux", "arm", "v7"))
    digest = registry.push_index("smoke/docker", "list", [amd, arm], format="docker")
    resp = get_manifest(registry.url, "smoke/docker", "list", DOCKER_LIST, timeout=10)
    assert resp.headers["Docker-Content-Digest"] == digest
    assert resp.content == make_index([amd, arm], "docker")[0]
    resp = get_manifest(registry.url, "smoke/docker", amd.manifest_digest, DOCKER_MANIFEST)
    assert resp.json()["config"]["mediaType"] == "application/vnd.docker.container.image.v1+json"


def test_registry_rejects_hostile_manifest_but_proxy_serves_it(
    registry: RegistryServer, registry_proxy: Proxy
) -> None:
    layer = Layer(random_tar(4, 1_000), override_digest="sha256:../../x")
    image = Image([layer])
    registry.push_blob("smoke/hostile", image.config_bytes())
    refused = registry.push_raw_manifest(
        "smoke/hostile", "bad", image.manifest_bytes(), OCI_MANIFEST
    )
    assert refused.status_code >= 400
    headers = {"Content-Type": OCI_MANIFEST, "Docker-Content-Digest": image.manifest_digest}
    registry_proxy.override(r"/manifests/bad$", 200, image.manifest_bytes(), headers)
    resp = get_manifest(registry_proxy.url, "smoke/hostile", "bad", OCI_MANIFEST, timeout=10)
    assert resp.status_code == 200 and b"sha256:../../x" in resp.content
    assert resp.headers["Docker-Content-Digest"] == image.manifest_digest
    head = requests.head(f"{registry_proxy.url}/v2/smoke/hostile/manifests/bad", timeout=10)
    assert head.headers["Content-Length"] == str(len(image.manifest_bytes()))


def test_proxy_counts_flips_fails_and_cuts(registry: RegistryServer, registry_proxy: Proxy) -> None:
    image = three_layer_image()
    registry.push_image("smoke/proxy", "v1", image)
    layer = image.layers[1]
    url = f"{registry_proxy.url}/v2/smoke/proxy/blobs/{layer.digest}"

    assert requests.get(url, timeout=10).content == layer.blob
    assert requests.get(url, timeout=10).content == layer.blob
    assert registry_proxy.count() == 2
    head = requests.head(url, timeout=10)
    assert head.headers["Content-Length"] == str(layer.size) and not head.content
    assert registry_proxy.count("HEAD") == 1
    manifest = get_manifest(registry_proxy.url, "smoke/proxy", "v1", OCI_MANIFEST, timeout=10)
    assert manifest.content == image.manifest_bytes()  # Accept reached the registry

    registry_proxy.flip_byte(r"/blobs/", offset=100_000, times=1)  # beyond the blob
    assert requests.get(url, timeout=10).content == layer.blob
    registry_proxy.flip_byte(r"/blobs/", offset=10, times=1)
    flipped = requests.get(url, timeout=10).content
    diffs = [i for i, (a, b) in enumerate(zip(flipped, layer.blob, strict=True)) if a != b]
    assert diffs == [10]
    registry_proxy.clear_rules()

    registry_proxy.fail(r"/blobs/", 503, times=1, headers={"Retry-After": "1"})
    first = requests.get(url, timeout=10)
    assert first.status_code == 503 and first.headers["Retry-After"] == "1"
    assert requests.get(url, timeout=10).content == layer.blob

    registry_proxy.reset_after(r"/blobs/", nbytes=1000)
    with pytest.raises(requests.exceptions.RequestException):
        requests.get(url, timeout=10).raise_for_status()
    rest = requests.get(url, headers={"Range": "bytes=1000-"}, timeout=10)
    assert rest.status_code == 206 and rest.content == layer.blob[1000:]

    log = registry_proxy.requests_log
    assert [hit.status for hit in log[-3:]] == [200, 200, 206]
    assert log[-2].bytes_sent == 1000
    registry_proxy.reset()
    assert registry_proxy.count(None, ".") == 0


def test_chunked_upload_through_proxy_rewrites_location(
    registry: RegistryServer, registry_proxy: Proxy
) -> None:
    data = random_tar(5, 3_000)
    digest = sha256_digest(data)
    base = f"{registry_proxy.url}/v2/smoke/upload/blobs"
    started = requests.post(f"{base}/uploads/", timeout=10)
    location = started.headers["Location"]
    assert started.status_code == 202 and location.startswith(registry_proxy.url)
    patched = requests.patch(location, data=iter([data[:1000], data[1000:]]), timeout=10)
    assert patched.status_code == 202
    done = requests.put(f"{patched.headers['Location']}&digest={digest}", timeout=10)
    assert done.status_code == 201
    assert requests.get(f"{registry.url}/v2/smoke/upload/blobs/{digest}").content == data
    assert registry_proxy.count("PATCH", "/uploads/") == 1


def test_htpasswd_registry(auth_registry: RegistryServer, docker_config: Path) -> None:
    assert requests.get(f"{auth_registry.url}/v2/", timeout=10).status_code == 401
    authed = requests.get(f"{auth_registry.url}/v2/", auth=("alice", "s3cret-pw"), timeout=10)
    assert authed.status_code == 200
    image = Image([Layer(random_tar(6, 2_000))])
    digest = auth_registry.push_image("smoke/private", "v1", image)
    assert digest == image.manifest_digest
    config = json.loads((docker_config / "config.json").read_text())
    assert config == {"auths": {auth_registry.host: {"auth": "YWxpY2U6czNjcmV0LXB3"}}}


def test_proxy_forwards_authorization(auth_registry: RegistryServer) -> None:
    with Proxy(auth_registry.url) as proxy:
        assert requests.get(f"{proxy.url}/v2/", timeout=10).status_code == 401
        authed = requests.get(f"{proxy.url}/v2/", auth=("alice", "s3cret-pw"), timeout=10)
        assert authed.status_code == 200
        assert [hit.status for hit in proxy.requests_log] == [401, 200]


def test_s3_round_trip(s3: S3Server) -> None:
    bucket = s3.create_bucket("smoke-bucket")
    client = s3.client()
    client.put_object(Bucket=bucket, Key="prefix/sha256_abc", Body=b"layer bytes")
    body = client.get_object(Bucket=bucket, Key="prefix/sha256_abc")["Body"].read()
    assert body == b"layer bytes"
    env = s3.env()
    assert env["AWS_ENDPOINT_URL_S3"] == s3.endpoint_url and env["AWS_DEFAULT_REGION"]
