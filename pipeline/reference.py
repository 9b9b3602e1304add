"""Image references: `[host[:port]/]repo[:tag][@digest]`, normalised as Docker does.

`alpine` means `docker.io/library/alpine:latest`; docker.io is served by
`registry-1.docker.io`. Parsing is strict: whatever comes out is safe to put in a URL.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from pipeline.digest import Digest
from pipeline.errors import InvalidDigest, InvalidReference

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
_HUB_ALIASES = {"docker.io", "index.docker.io", "registry-1.docker.io"}

_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")  # ASCII only: no lookalike letters
_HOST = re.compile(
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
    r"|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?"
)
_MAX_NAME = 255


@dataclass(frozen=True)
class Reference:
    registry: str          # "docker.io", "127.0.0.1:5000", "ghcr.io"
    repository: str        # "library/alpine"
    tag: str | None = None
    digest: Digest | None = None

    @classmethod
    def parse(cls, text: str) -> Reference:
        if not isinstance(text, str) or not text.strip():
            raise InvalidReference("empty image reference")
        text = text.strip()

        def bad(why: str) -> InvalidReference:
            return InvalidReference(f"invalid image reference {text[:200]!r}: {why}")

        if any(c.isspace() for c in text):
            raise bad("contains whitespace")
        name, digest = text, None
        if "@" in text:
            name, _, digest_text = text.partition("@")
            try:
                digest = Digest.parse(digest_text)
            except InvalidDigest as e:
                raise bad(str(e)) from None
        tag = None
        last_slash = name.rfind("/")
        colon = name.rfind(":")
        if colon > last_slash:
            name, tag = name[:colon], name[colon + 1 :]
            if not _TAG.fullmatch(tag):
                raise bad(f"invalid tag {tag[:130]!r}")
        first, sep, rest = name.partition("/")
        if sep and ("." in first or ":" in first or first == "localhost" or first.startswith("[")):
            if not _HOST.fullmatch(first):
                raise bad(f"invalid registry host {first!r}")
            port = first.rpartition(":")[2] if not first.endswith("]") else ""
            if port.isdigit() and not 0 < int(port) < 65536:
                raise bad(f"invalid port {port} in registry host {first!r}")
            registry, path = first, rest
        else:
            registry, path = DOCKER_HUB, name
        if registry.lower() in _HUB_ALIASES:
            registry = DOCKER_HUB
            if "/" not in path:
                path = "library/" + path
        if not path:
            raise bad("missing repository name")
        if path != path.lower() and all(_COMPONENT.fullmatch(c) for c in path.lower().split("/")):
            raise bad("repository name must be lowercase")
        for component in path.split("/"):
            if not _COMPONENT.fullmatch(component):
                raise bad(f"invalid repository path component {component[:80]!r}")
        if len(registry) + 1 + len(path) > _MAX_NAME:
            raise bad(f"name longer than {_MAX_NAME} characters")
        if tag is None and digest is None:
            tag = "latest"
        return cls(registry, path, tag, digest)

    @property
    def api_host(self) -> str:
        """The host that serves the registry API for this reference."""
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    @property
    def name(self) -> str:
        return f"{self.registry}/{self.repository}"

    @property
    def manifest_id(self) -> str:
        """What goes after /manifests/ in the URL: the digest when pinned, else the tag."""
        return str(self.digest) if self.digest else (self.tag or "latest")

    def with_digest(self, digest: Digest) -> Reference:
        return replace(self, digest=digest)

    def __str__(self) -> str:
        out = self.name
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out
