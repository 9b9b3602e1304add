"""A real OCI registry (CNCF distribution, ``docker-registry``) for tests, plus a push client.

Tests push images they built with ``tests.support.images`` over the registry HTTP API,
exactly as a client would, so the product code reads them back through a real server.
"""

from __future__ import annotations

import copy
import json
import subprocess
from collections.abc import Sequence
from pathlib import Path

import requests

from tests.support.images import Image, make_index, sha256_digest
from tests.support.procs import ServerProcess, ServiceError, require_binary

_HINT = "install the Debian package docker-registry (apt-get install docker-registry)"


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


class RegistryServer(ServerProcess):
    """``docker-registry serve`` on a free 127.0.0.1 port with storage in a temp dir.

    ``htpasswd=(user, password)`` turns on basic auth; pushes then send those
    credentials. ``extra_config`` is deep-merged into the YAML config (e.g. ``auth.token``).
    """

    name = "docker-registry"
    probe_path = "/v2/"

    def __init__(
        self,
        htpasswd: tuple[str, str] | None = None,
        extra_config: dict | None = None,
    ) -> None:
        super().__init__()
        self.htpasswd = htpasswd
        self.extra_config = extra_config or {}
        self.binary = require_binary("docker-registry", _HINT)
        if htpasswd:
            require_binary("htpasswd", "install the Debian package apache2-utils")
        self.session = requests.Session()
        self.session.auth = htpasswd

    def command(self, port: int) -> list[str]:
        return [self.binary, "serve", str(self.workdir / "config.yml")]

    def prepare(self, workdir: Path, port: int) -> None:
        config: dict = {
            "version": 0.1,
            "log": {"level": "warn", "accesslog": {"disabled": True}},
            "storage": {
                "filesystem": {"rootdirectory": str(workdir / "storage")},
                "delete": {"enabled": True},
                "redirect": {"disable": True},
            },
            "http": {"addr": f"127.0.0.1:{port}", "secret": "test-only"},
        }
        if self.htpasswd:
            user, password = self.htpasswd
            line = subprocess.run(
                ["htpasswd", "-Bbn", user, password], check=True, capture_output=True
            ).stdout
            (workdir / "htpasswd").write_bytes(line.strip() + b"\n")
            config["auth"] = {
                "htpasswd": {"realm": "layerwarm-test", "path": str(workdir / "htpasswd")}
            }
        config = _merge(config, self.extra_config)
        # YAML is a superset of JSON, so no YAML library is needed.
        (workdir / "config.yml").write_text(json.dumps(config, indent=2))

    def is_ready(self, response: requests.Response) -> bool:
        return response.status_code in (200, 401)

    # ------------------------------------------------------------ push API

    def _check(self, response: requests.Response, what: str) -> requests.Response:
        if not response.ok:
            raise ServiceError(
                f"docker-registry refused {what}: HTTP {response.status_code} {response.text[:500]}"
            )
        return response

    def push_blob(self, repo: str, data: bytes) -> str:
        """Upload ``data`` as a blob (POST then PUT ?digest=), skipping it if present."""
        digest = sha256_digest(data)
        base = f"{self.url}/v2/{repo}/blobs"
        if self.session.head(f"{base}/{digest}", timeout=30).status_code == 200:
            return digest
        started = self._check(
            self.session.post(f"{base}/uploads/", timeout=30), f"upload start in {repo}"
        )
        location = started.headers["Location"]
        if location.startswith("/"):
            location = self.url + location
        sep = "&" if "?" in location else "?"
        self._check(
            self.session.put(
                f"{location}{sep}digest={digest}",
                data=data,
                headers={"Content-Type": "application/octet-stream"},
                timeout=120,
            ),
            f"blob {digest} in {repo}",
        )
        return digest

    def push_raw_manifest(
        self, repo: str, reference: str, data: bytes, media_type: str
    ) -> requests.Response:
        """PUT any bytes as a manifest and return the response unchecked (hostile tests)."""
        return self.session.put(
            f"{self.url}/v2/{repo}/manifests/{reference}",
            data=data,
            headers={"Content-Type": media_type},
            timeout=30,
        )

    def push_manifest(self, repo: str, reference: str, data: bytes, media_type: str) -> str:
        """PUT a manifest under a tag or digest; return its digest. Raises if refused."""
        response = self._check(
            self.push_raw_manifest(repo, reference, data, media_type),
            f"manifest {repo}:{reference}",
        )
        return response.headers.get("Docker-Content-Digest") or sha256_digest(data)

    def push_image(self, repo: str, tag: str, image: Image) -> str:
        """Push layers, config and manifest of ``image`` as ``repo:tag``; return manifest digest."""
        for layer in image.layers:
            self.push_blob(repo, layer.blob)
        self.push_blob(repo, image.config_bytes())
        return self.push_manifest(repo, tag, image.manifest_bytes(), image.manifest_media_type)

    def push_index(self, repo: str, tag: str, images: Sequence[Image], format: str = "oci") -> str:
        """Push every image by digest, then an index/manifest list as ``repo:tag``."""
        for image in images:
            self.push_image(repo, image.manifest_digest, image)
        data, media_type, _digest = make_index(images, format)
        return self.push_manifest(repo, tag, data, media_type)
