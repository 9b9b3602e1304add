"""Deterministic builders for test images: tar layers, configs, manifests and indexes.

Everything here is plain Python (no pytest) so benchmarks can reuse it. The same
inputs always give the same bytes, hence the same digests, across runs and machines.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property

import zstandard

# Re-exported: tests and benchmarks import the whole builder from this one module.
from tests.support.tars import (
    MTIME,
    Dir,
    Entry,
    File,
    Hardlink,
    Symlink,
    Whiteout,
    make_tar,
    random_tar,
)

__all__ = [
    "MTIME", "Dir", "Entry", "File", "Hardlink", "Symlink", "Whiteout", "make_tar", "random_tar",
    "OCI_MANIFEST", "OCI_INDEX", "OCI_CONFIG", "DOCKER_MANIFEST", "DOCKER_LIST", "DOCKER_CONFIG",
    "sha256_digest", "canonical_json", "compress", "Layer", "Platform", "Image", "make_index",
]  # fmt: skip

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"

_LAYER_TYPES = {
    "oci": {
        "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
        "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
        "none": "application/vnd.oci.image.layer.v1.tar",
    },
    "docker": {
        "gzip": "application/vnd.docker.image.rootfs.diff.tar.gzip",
        "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",  # Docker has no zstd type
        "none": "application/vnd.docker.image.rootfs.diff.tar",
    },
}


def sha256_digest(data: bytes) -> str:
    """Return the OCI digest string ``sha256:<hex>`` of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical_json(obj: object) -> bytes:
    """Serialise compactly with sorted keys, so equal documents have equal digests."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


# ---------------------------------------------------------------- layers and images


def compress(data: bytes, compression: str) -> bytes:
    """Compress like real tools: gzip without mtime, zstd without content size."""
    if compression == "gzip":
        return gzip.compress(data, compresslevel=6, mtime=0)
    if compression == "zstd":
        zstd = zstandard.ZstdCompressor(write_content_size=False, write_checksum=True)
        return zstd.compress(data)
    if compression == "none":
        return data
    raise ValueError(f"unknown compression {compression!r}")


# Every optional field of a gzip member header, as RFC 1952 allows: FEXTRA (3 bytes), FNAME,
# FCOMMENT, and FHCRC, the header's own CRC (GNU gzip writes FNAME, BGZF writers FEXTRA).
ALL_HEADER_FIELDS = (4 | 8 | 16 | 2,
                     struct.pack("<H", 3) + b"xyz" + b"layer.tar\0" + b"a comment\0")


def gzip_member(data: bytes, flags: int = 0, fields: bytes = b"",
                crc: int | None = None, size: int | None = None) -> bytes:
    """One gzip member written field by field: header flags and their fields (in RFC
    order), the CRC and length of `data` unless given."""
    header = b"\x1f\x8b\x08" + bytes([flags]) + b"\0\0\0\0\0\xff" + fields
    if flags & 2:  # FHCRC: the low 16 bits of the CRC-32 of the header so far
        header += struct.pack("<H", zlib.crc32(header) & 0xFFFF)
    deflate = zlib.compressobj(6, zlib.DEFLATED, -15)
    body = deflate.compress(data) + deflate.flush()
    trailer = struct.pack("<II", zlib.crc32(data) if crc is None else crc,
                          len(data) if size is None else size)
    return header + body + trailer


@dataclass(frozen=True)
class Layer:
    """One layer: its tar and compression, plus optional lies the manifest/config tell.

    The ``override_*`` fields change only what is *written* in the manifest or config
    (hostile or broken images); ``blob``/``digest``/``diff_id``/``size`` stay the truth.
    """

    tar: bytes
    compression: str = "gzip"
    override_media_type: str | None = None
    override_digest: str | None = None
    override_size: int | None = None
    override_diff_id: str | None = None

    def __post_init__(self) -> None:
        if self.compression not in _LAYER_TYPES["oci"]:
            raise ValueError(f"compression must be gzip, zstd or none, not {self.compression!r}")

    @cached_property
    def blob(self) -> bytes:
        return compress(self.tar, self.compression)

    @cached_property
    def digest(self) -> str:
        return sha256_digest(self.blob)

    @cached_property
    def diff_id(self) -> str:
        return sha256_digest(self.tar)

    @property
    def size(self) -> int:
        return len(self.blob)

    @property
    def media_type(self) -> str:
        """The media type as written in an OCI manifest."""
        return self.media_type_for("oci")

    def media_type_for(self, fmt: str) -> str:
        """The media type written in a manifest of format ``fmt`` ('oci' or 'docker')."""
        return self.override_media_type or _LAYER_TYPES[fmt][self.compression]

    def descriptor(self, fmt: str = "oci") -> dict[str, object]:
        """The manifest descriptor for this layer, overrides applied."""
        return {
            "mediaType": self.media_type_for(fmt),
            "digest": self.override_digest or self.digest,
            "size": self.size if self.override_size is None else self.override_size,
        }


@dataclass(frozen=True)
class Platform:
    """OS/architecture/variant of an image, as in an index's ``platform`` field."""

    os: str = "linux"
    architecture: str = "amd64"
    variant: str | None = None

    def as_dict(self) -> dict[str, str]:
        out = {"architecture": self.architecture, "os": self.os}
        if self.variant:
            out["variant"] = self.variant
        return out


@dataclass
class Image:
    """A single-platform image in OCI or Docker schema 2 format."""

    layers: list[Layer]
    platform: Platform = field(default_factory=Platform)
    format: str = "oci"

    def __post_init__(self) -> None:
        if self.format not in _LAYER_TYPES:
            raise ValueError(f"format must be 'oci' or 'docker', not {self.format!r}")

    def config_bytes(self) -> bytes:
        config = {
            **self.platform.as_dict(),
            "created": "2023-11-14T22:13:20Z",
            "config": {"Env": ["PATH=/usr/local/bin:/usr/bin:/bin"]},
            "rootfs": {
                "type": "layers",
                "diff_ids": [lay.override_diff_id or lay.diff_id for lay in self.layers],
            },
        }
        return canonical_json(config)

    @property
    def config_digest(self) -> str:
        return sha256_digest(self.config_bytes())

    @property
    def manifest_media_type(self) -> str:
        return OCI_MANIFEST if self.format == "oci" else DOCKER_MANIFEST

    def manifest_bytes(self) -> bytes:
        config = self.config_bytes()
        manifest = {
            "schemaVersion": 2,
            "mediaType": self.manifest_media_type,
            "config": {
                "mediaType": OCI_CONFIG if self.format == "oci" else DOCKER_CONFIG,
                "digest": sha256_digest(config),
                "size": len(config),
            },
            "layers": [lay.descriptor(self.format) for lay in self.layers],
        }
        return canonical_json(manifest)

    @property
    def manifest_digest(self) -> str:
        return sha256_digest(self.manifest_bytes())


def make_index(images: Sequence[Image], format: str = "oci") -> tuple[bytes, str, str]:
    """Build an OCI index or Docker manifest list; returns ``(bytes, media_type, digest)``."""
    media_type = {"oci": OCI_INDEX, "docker": DOCKER_LIST}[format]
    index = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "manifests": [
            {
                "mediaType": img.manifest_media_type,
                "digest": img.manifest_digest,
                "size": len(img.manifest_bytes()),
                "platform": img.platform.as_dict(),
            }
            for img in images
        ],
    }
    data = canonical_json(index)
    return data, media_type, sha256_digest(data)
