"""Descriptors, manifests, indexes, image configs, and choosing a platform from an index.

Parsing is strict where it matters for safety (every digest is a `Digest`, sizes are
non-negative integers) and lenient where registries differ (a missing `mediaType` field is
inferred from the document's shape).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any

from pipeline.digest import Digest
from pipeline.errors import InvalidDigest, InvalidManifest, PlatformNotFound, UnsupportedMediaType

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})
IMAGE_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
MANIFEST_TYPES = (OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST)

MAX_LAYERS = 1024


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str | None = None

    @classmethod
    def parse(cls, text: str) -> Platform:
        parts = text.strip().split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise InvalidManifest(f"invalid platform {text!r}: want os/arch[/variant]")
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else None).normalized()

    @classmethod
    def host(cls) -> Platform:
        # platform.machine() is os.uname().machine on POSIX (where fcntl, and so this
        # project, runs); importing the platform module cost every warm ~2 ms.
        machine = os.uname().machine.lower()
        arch, variant = {
            "x86_64": ("amd64", None), "amd64": ("amd64", None),
            "aarch64": ("arm64", None), "arm64": ("arm64", None),
            "armv7l": ("arm", "v7"), "armv6l": ("arm", "v6"),
            "i386": ("386", None), "i686": ("386", None),
            "ppc64le": ("ppc64le", None), "s390x": ("s390x", None), "riscv64": ("riscv64", None),
        }.get(machine, (machine, None))
        return cls("linux", arch, variant)

    def normalized(self) -> Platform:
        # arm64 images are v8 whether or not they say so (containerd's rule).
        if self.architecture == "arm64" and self.variant == "v8":
            return Platform(self.os, self.architecture, None)
        return self

    def matches(self, other: Platform) -> bool:
        """Does an index entry `other` satisfy this requested platform?"""
        a, b = self.normalized(), other.normalized()
        if (a.os, a.architecture) != (b.os, b.architecture):
            return False
        return a.variant is None or a.variant == b.variant

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


_PLATFORM_FIELD = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")


def _platform_fields(obj: dict[str, Any]) -> Platform | None:
    """os/architecture[/variant] from JSON, only if each is a short plain name (they end up
    in messages and comparisons; a newline or an object there is hostile, not a platform)."""
    os_, arch, variant = obj.get("os"), obj.get("architecture"), obj.get("variant")
    fields = [os_, arch] + ([variant] if variant is not None else [])
    if not all(isinstance(f, str) and _PLATFORM_FIELD.fullmatch(f) for f in fields):
        return None
    return Platform(os_, arch, variant)


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: Digest
    size: int
    platform: Platform | None = None
    annotations: dict[str, str] = field(default_factory=dict, compare=False, hash=False)

    @classmethod
    def from_json(cls, obj: Any, where: str) -> Descriptor:
        if not isinstance(obj, dict):
            raise InvalidManifest(f"{where}: descriptor is not an object")
        media_type = obj.get("mediaType", "")
        size = obj.get("size")
        if not isinstance(media_type, str):
            raise InvalidManifest(f"{where}: mediaType is not a string")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise InvalidManifest(f"{where}: size {size!r} is not a non-negative integer")
        try:
            digest = Digest.parse(obj.get("digest"))
        except InvalidDigest as e:
            raise InvalidDigest(f"{where}: {e}") from None
        plat = None
        if isinstance(obj.get("platform"), dict):
            plat = _platform_fields(obj["platform"])
            if plat is None:
                raise InvalidManifest(f"{where}: platform fields are not short plain names")
        annotations = obj.get("annotations") if isinstance(obj.get("annotations"), dict) else {}
        return cls(media_type, digest, size, plat, annotations)


@dataclass(frozen=True)
class ImageManifest:
    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]


@dataclass(frozen=True)
class ImageIndex:
    media_type: str
    manifests: tuple[Descriptor, ...]

    def select(self, wanted: Platform) -> Descriptor:
        for d in self.manifests:
            if d.platform and wanted.matches(d.platform) and d.media_type in IMAGE_TYPES:
                return d
        offered = ", ".join(str(d.platform) for d in self.manifests if d.platform) or "none"
        raise PlatformNotFound(f"no manifest for platform {wanted} (index offers: {offered})")

    def images(self) -> tuple[Descriptor, ...]:
        """Every platform's image manifest, skipping attestations and unknown platforms."""
        return tuple(
            d for d in self.manifests
            if d.media_type in IMAGE_TYPES and d.platform and d.platform.os != "unknown"
        )


@dataclass(frozen=True)
class ImageConfig:
    diff_ids: tuple[Digest, ...]
    platform: Platform | None


def _load_json(data: bytes, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(data)
    except RecursionError:  # e.g. 200,000 `[`: no real document nests like that
        raise InvalidManifest(f"{what} is not valid JSON: nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, and UnicodeError on undecodable bytes
        raise InvalidManifest(f"{what} is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise InvalidManifest(f"{what} is not a JSON object")
    return obj


def parse_manifest(data: bytes, content_type: str | None = None) -> ImageManifest | ImageIndex:
    """Parse an image manifest or index; `content_type` is the registry's Content-Type."""
    obj = _load_json(data, "manifest")
    if obj.get("schemaVersion") == 1:
        raise UnsupportedMediaType("unsupported media type: Docker schema 1 manifest")
    declared = obj.get("mediaType")
    header = (content_type or "").split(";")[0].strip()
    media_type = declared if isinstance(declared, str) and declared else header
    if media_type not in MANIFEST_TYPES:
        # Some registries serve OCI documents without mediaType; infer from the shape.
        if "manifests" in obj:
            media_type = OCI_INDEX
        elif "layers" in obj and "config" in obj:
            media_type = OCI_MANIFEST
        else:
            raise UnsupportedMediaType(f"unsupported media type: manifest {media_type!r}")
    if media_type in INDEX_TYPES:
        items = obj.get("manifests")
        if not isinstance(items, list):
            raise InvalidManifest("index: 'manifests' is not a list")
        return ImageIndex(
            media_type,
            tuple(Descriptor.from_json(m, f"index entry {i}") for i, m in enumerate(items)),
        )
    layers = obj.get("layers")
    if not isinstance(layers, list):
        raise InvalidManifest("manifest: 'layers' is not a list")
    if len(layers) > MAX_LAYERS:
        raise InvalidManifest(f"manifest has {len(layers)} layers; the limit is {MAX_LAYERS}")
    return ImageManifest(
        media_type,
        Descriptor.from_json(obj.get("config"), "manifest config"),
        tuple(Descriptor.from_json(x, f"manifest layer {i}") for i, x in enumerate(layers)),
    )


def parse_config(data: bytes) -> ImageConfig:
    obj = _load_json(data, "image config")
    rootfs = obj.get("rootfs")
    if not isinstance(rootfs, dict) or not isinstance(rootfs.get("diff_ids"), list):
        raise InvalidManifest("image config has no rootfs.diff_ids list")
    try:
        diff_ids = tuple(Digest.parse(d) for d in rootfs["diff_ids"])
    except InvalidDigest as e:
        raise InvalidDigest(f"image config diff_id: {e}") from None
    # The config's platform is only informative: an odd one is dropped, not an error.
    return ImageConfig(diff_ids, _platform_fields(obj))
