"""Digest, Reference, Platform and manifest parsing: the values everything else trusts."""

from __future__ import annotations

import json

import pytest

from pipeline.digest import Digest, Verifier
from pipeline.errors import (
    DigestMismatch,
    InvalidDigest,
    InvalidManifest,
    InvalidReference,
    PlatformNotFound,
    SizeMismatch,
    UnsupportedMediaType,
)
from pipeline.manifest import ImageIndex, ImageManifest, Platform, parse_config, parse_manifest
from pipeline.reference import Reference

HEX = "a" * 64


@pytest.mark.parametrize(
    "text",
    [
        "sha256:../../x",
        "sha256:" + "A" * 64,
        "sha256:" + "a" * 63,
        "sha256:" + "a" * 65,
        "md5:" + "a" * 32,
        "sha256_" + HEX,  # cache-name form only where explicitly allowed
        "sha256:" + "a" * 60 + "/../",
        "",
        "sha256:" + HEX + "\n",
        "sha512:" + "a" * 64,
    ],
)
def test_hostile_or_malformed_digests_are_rejected(text: str) -> None:
    with pytest.raises(InvalidDigest):
        Digest.parse(text)


def test_digest_forms() -> None:
    d = Digest.parse("sha256:" + HEX)
    assert str(d) == "sha256:" + HEX
    assert d.cache_name == "sha256_" + HEX
    assert Digest.parse("sha256_" + HEX, allow_cache_name=True) == d
    assert Digest.parse("sha512:" + "b" * 128).cache_name == "sha512_" + "b" * 128
    assert Digest.of_bytes(b"") == Digest.parse(
        "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    )


def test_verifier_names_both_digests_and_checks_size() -> None:
    good = Digest.of_bytes(b"hello")
    v = Verifier(good, size=5, what="layer blob")
    v.update(b"hellO")
    with pytest.raises(DigestMismatch) as e:
        v.verify()
    assert str(good) in str(e.value) and str(Digest.of_bytes(b"hellO")) in str(e.value)
    v = Verifier(good, size=5)
    with pytest.raises(SizeMismatch):
        v.update(b"hello!")
    v = Verifier(good, size=5)
    v.update(b"hell")
    with pytest.raises(SizeMismatch):
        v.verify()


@pytest.mark.parametrize(
    "text, registry, repository, tag, digest",
    [
        ("alpine", "docker.io", "library/alpine", "latest", None),
        ("alpine:3.19", "docker.io", "library/alpine", "3.19", None),
        ("docker.io/alpine", "docker.io", "library/alpine", "latest", None),
        ("index.docker.io/team/app:1", "docker.io", "team/app", "1", None),
        ("team/app", "docker.io", "team/app", "latest", None),
        ("127.0.0.1:5000/team/app:1.4", "127.0.0.1:5000", "team/app", "1.4", None),
        ("localhost/app", "localhost", "app", "latest", None),
        ("ghcr.io/o/r/deep/name:v1_x-2", "ghcr.io", "o/r/deep/name", "v1_x-2", None),
        (f"ghcr.io/o/r@sha256:{HEX}", "ghcr.io", "o/r", None, f"sha256:{HEX}"),
        (f"quay.io/o/r:t@sha256:{HEX}", "quay.io", "o/r", "t", f"sha256:{HEX}"),
        ("[::1]:5000/app:1", "[::1]:5000", "app", "1", None),
    ],
)
def test_references_normalise_like_docker(text, registry, repository, tag, digest) -> None:
    ref = Reference.parse(text)
    assert (ref.registry, ref.repository, ref.tag) == (registry, repository, tag)
    assert (str(ref.digest) if ref.digest else None) == digest


def test_docker_hub_is_served_by_registry_1() -> None:
    assert Reference.parse("alpine").api_host == "registry-1.docker.io"
    assert Reference.parse("127.0.0.1:5000/a").api_host == "127.0.0.1:5000"


@pytest.mark.parametrize(
    "text, why",
    [
        ("", "empty"),
        ("Alpine", "lowercase"),
        ("team//app", "component"),
        ("app:", "tag"),
        ("app:-bad", "tag"),
        ("app@sha256:../../x", "digest"),
        ("app@sha256:123", "digest"),
        ("a b", "whitespace"),
        ("registry.io/", "missing repository"),
        ("-app", "component"),
        ("x" * 300, "longer"),
        ("bad_host!.io/app", "registry host"),
    ],
)
def test_invalid_references_say_what_is_wrong(text: str, why: str) -> None:
    with pytest.raises(InvalidReference) as e:
        Reference.parse(text)
    assert why in str(e.value)


def test_platform_matching() -> None:
    assert Platform.parse("linux/arm64").matches(Platform("linux", "arm64", "v8"))
    assert Platform.parse("linux/arm/v7").matches(Platform("linux", "arm", "v7"))
    assert not Platform.parse("linux/arm/v7").matches(Platform("linux", "arm", "v6"))
    assert not Platform.parse("linux/amd64").matches(Platform("windows", "amd64"))
    with pytest.raises(InvalidManifest):
        Platform.parse("linux")


def _desc(media_type: str, fill: str, size: int = 10, **extra) -> dict:
    return {"mediaType": media_type, "digest": "sha256:" + fill * 64, "size": size, **extra}


def test_parse_index_and_select_platform() -> None:
    m = "application/vnd.oci.image.manifest.v1+json"
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            _desc(m, "1", platform={"os": "linux", "architecture": "amd64"}),
            _desc(m, "2", platform={"os": "linux", "architecture": "arm64", "variant": "v8"}),
            _desc(m, "3", platform={"os": "unknown", "architecture": "unknown"}),
        ],
    }
    doc = parse_manifest(json.dumps(index).encode())
    assert isinstance(doc, ImageIndex)
    assert doc.select(Platform.parse("linux/arm64")).digest.hex == "2" * 64
    assert [d.digest.hex[0] for d in doc.images()] == ["1", "2"]
    with pytest.raises(PlatformNotFound) as e:
        doc.select(Platform.parse("linux/s390x"))
    assert "linux/amd64" in str(e.value)


def test_parse_manifest_infers_type_and_rejects_bad_input() -> None:
    layer = "application/vnd.oci.image.layer.v1.tar+gzip"
    doc = {"schemaVersion": 2, "config": _desc("x", "c"), "layers": [_desc(layer, "d")]}
    parsed = parse_manifest(json.dumps(doc).encode(), "application/json")
    assert isinstance(parsed, ImageManifest) and parsed.layers[0].size == 10
    with pytest.raises(UnsupportedMediaType):
        parse_manifest(json.dumps({"schemaVersion": 1, "fsLayers": []}).encode())
    with pytest.raises(InvalidManifest):
        parse_manifest(b"\xff not json")
    hostile = dict(doc, layers=[dict(_desc(layer, "d"), digest="sha256:../../x")])
    with pytest.raises(InvalidDigest) as e:
        parse_manifest(json.dumps(hostile).encode())
    assert "manifest layer 0" in str(e.value)
    negative = dict(doc, layers=[_desc(layer, "d", size=-1)])
    with pytest.raises(InvalidManifest):
        parse_manifest(json.dumps(negative).encode())


def test_parse_config_diff_ids() -> None:
    cfg = {"os": "linux", "architecture": "amd64", "rootfs": {"diff_ids": ["sha256:" + HEX]}}
    parsed = parse_config(json.dumps(cfg).encode())
    assert parsed.diff_ids == (Digest.parse("sha256:" + HEX),)
    assert str(parsed.platform) == "linux/amd64"
    with pytest.raises(InvalidManifest):
        parse_config(b'{"rootfs": {}}')
