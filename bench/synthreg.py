"""A synthetic OCI registry for planning at scale (scenario S2): just the read endpoints
`layerwarm plan` needs, documents generated on the fly, every request counted.

    GET /v2/                              200 {}
    GET /v2/<repo>/manifests/<tag>        image manifest (OCI), Docker-Content-Digest
    GET /v2/<repo>/manifests/<digest>     the same documents, by digest
    GET /v2/<repo>/blobs/<config digest>  the image config
    HEAD of each of those                 headers only

The fleet: ``refs`` references ``synth/r<RRR>:t<TT>`` (``per_repo`` tags a repository)
over ``manifests`` unique image manifests over ``layers`` unique layers. Reference j
(0-based) names manifest ``j % manifests``, so each manifest sits under
``refs / manifests`` tags in as many repositories. Manifest m lists ``per_image`` layers,
``(m + k * 101) % layers`` for k < per_image, and has its own config (so its own digest).
Layer digests, diff_ids and sizes are derived from the layer number; no layer blob is
served (planning fetches none: a GET of one is counted as "other" and answered 404).

Memory stays bounded: each document is built once, at start (two a manifest, ~1 KiB each:
~4 MiB for 2,000 manifests), beside the digest -> manifest number maps and the per-path
request counter.

The server is the bench's environment, not what is measured: it should cost the machine
(2 cores, shared with the client measured) as little per request as it can. So answers are
those prebuilt bytes, and the request loop reads the request line and headers itself,
without http.server's per-request header parsing (email.parser) and response assembly;
with them it took ~0.3 ms of CPU a request, a quarter of the plan's own.
"""

from __future__ import annotations

import hashlib
import json
import platform
import re
import socketserver
import threading
from collections import Counter
from http import HTTPStatus

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
_PATH = re.compile(r"^/v2/(?P<repo>.+)/(?P<kind>manifests|blobs)/(?P<ref>[^/]+)$")
_TAGGED = re.compile(r"^synth/r(\d+)$")


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _canonical(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _arch() -> str:
    m = platform.machine().lower()
    return {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm"}.get(m, m)


class SynthFleet:
    """The documents of the synthetic fleet (see the module docstring)."""

    def __init__(self, refs: int = 10_000, manifests: int = 2_000, layers: int = 500,
                 per_image: int = 5, per_repo: int = 100) -> None:
        if per_image > layers or refs % per_repo:
            raise ValueError("per_image must be <= layers and per_repo divide refs")
        self.n_refs, self.n_manifests, self.n_layers = refs, manifests, layers
        self.per_image, self.per_repo = per_image, per_repo
        self.arch = _arch()
        self.by_manifest_digest: dict[str, int] = {}
        self.by_config_digest: dict[str, int] = {}
        # (body, digest) of each manifest and config, built once (see the module docstring).
        self.manifests: list[tuple[bytes, str]] = []
        self.configs: list[tuple[bytes, str]] = []
        for m in range(manifests):
            config, manifest = self.config(m), self.manifest(m)
            self.configs.append((config, _sha(config)))
            self.manifests.append((manifest, _sha(manifest)))
            self.by_config_digest[self.configs[m][1]] = m
            self.by_manifest_digest[self.manifests[m][1]] = m

    # -- the fleet
    def ref_names(self) -> list[str]:
        """``repo:tag`` of every reference, j = 0 ... refs-1."""
        return [f"synth/r{j // self.per_repo:03d}:t{j % self.per_repo:02d}"
                for j in range(self.n_refs)]

    def layer_numbers(self, m: int) -> list[int]:
        return sorted({(m + k * 101) % self.n_layers for k in range(self.per_image)})

    def used_layers(self) -> set[int]:
        return {x for m in range(self.n_manifests) for x in self.layer_numbers(m)}

    def manifest_of(self, repo: str, tag: str) -> int | None:
        r, t = _TAGGED.match(repo), re.fullmatch(r"t(\d+)", tag)
        if not (r and t) or int(t.group(1)) >= self.per_repo:
            return None
        j = int(r.group(1)) * self.per_repo + int(t.group(1))
        return j % self.n_manifests if j < self.n_refs else None

    # -- documents, built on each call (the server answers with the ones built at start)
    @staticmethod
    def _layer(n: int) -> tuple[str, str, int]:
        """(digest, diff_id, size) of layer n: made-up digests, 1-40 MiB."""
        digest = _sha(b"synthetic layer blob %d" % n)
        diff_id = _sha(b"synthetic layer tar %d" % n)
        return digest, diff_id, (1 + (n * 7919) % 40) << 20

    def config(self, m: int) -> bytes:
        return _canonical({
            "architecture": self.arch, "os": "linux", "created": "2024-01-01T00:00:00Z",
            "config": {"Env": ["PATH=/usr/bin:/bin", f"SYNTH_IMAGE={m}"]},
            "rootfs": {"type": "layers",
                       "diff_ids": [self._layer(n)[1] for n in self.layer_numbers(m)]},
        })  # fmt: skip

    def manifest(self, m: int) -> bytes:
        config = self.config(m)
        return _canonical({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": _sha(config), "size": len(config)},
            "layers": [{"mediaType": OCI_LAYER, "digest": d, "size": s}
                       for d, _, s in map(self._layer, self.layer_numbers(m))],
        })  # fmt: skip


class SynthRegistry:
    """``SynthFleet`` served over HTTP/1.1 (keep-alive) on a free 127.0.0.1 port, in threads.

    ``counts`` is requests by kind (ping, manifest-tag, manifest-digest, config, other);
    ``paths`` is requests by (method, path), to see any document asked more than once.
    """

    def __init__(self, fleet: SynthFleet) -> None:
        self.fleet = fleet
        self.lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.paths: Counter[tuple[str, str]] = Counter()
        self.bytes_sent = 0
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.synth = self  # type: ignore[attr-defined]
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def reset(self) -> None:
        with self.lock:
            self.counts.clear()
            self.paths.clear()
            self.bytes_sent = 0

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def answer(self, method: str, path: str) -> tuple[int, dict[str, str], bytes, str]:
        """(status, headers, body, kind) for one request."""
        path = path.split("?", 1)[0]
        if path in ("/v2/", "/v2"):
            return 200, {"Content-Type": "application/json"}, b"{}", "ping"
        match = _PATH.match(path)
        if match is None:
            return 404, {}, b"", "other"
        repo, kind, ref = match["repo"], match["kind"], match["ref"]
        f = self.fleet
        if kind == "manifests":
            if ref.startswith("sha256:"):
                m, what = f.by_manifest_digest.get(ref), "manifest-digest"
            else:
                m, what = f.manifest_of(repo, ref), "manifest-tag"
            if m is None:
                return 404, {}, b"", what
            body, digest = f.manifests[m]
            return 200, {"Content-Type": OCI_MANIFEST, "Docker-Content-Digest": digest}, body, what
        m = f.by_config_digest.get(ref)
        if m is None:
            return 404, {}, b"", "other"
        return 200, {"Content-Type": "application/octet-stream",
                     "Docker-Content-Digest": ref}, f.configs[m][0], "config"


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True


class _Handler(socketserver.StreamRequestHandler):
    """HTTP/1.1 GET and HEAD with keep-alive, nothing else (see the module docstring)."""

    # Head and body go out in one write, without Nagle: two small writes per answer would
    # meet the client's delayed ACK (~40 ms a request on loopback), which no real registry
    # server does.
    disable_nagle_algorithm = True

    def handle(self) -> None:
        synth: SynthRegistry = self.server.synth  # type: ignore[attr-defined]
        while True:
            line = self.rfile.readline(65537)
            parts = line.split()
            if len(parts) != 3:
                return  # connection closed (or not HTTP)
            keep = parts[2] == b"HTTP/1.1"
            while (header := self.rfile.readline(65537)) not in (b"\r\n", b"\n", b""):
                name, _, value = header.partition(b":")
                if name.strip().lower() == b"connection":
                    keep = value.strip().lower() == b"keep-alive" or (
                        keep and value.strip().lower() != b"close")
            method, path = parts[0].decode("latin-1"), parts[1].decode("latin-1")
            if method in ("GET", "HEAD"):
                status, headers, body, kind = synth.answer(method, path)
                with synth.lock:
                    synth.counts[f"{method} {kind}"] += 1
                    synth.paths[(method, path)] += 1
                    synth.bytes_sent += 0 if method == "HEAD" else len(body)
            else:
                status, headers, body, keep = 501, {}, b"", False
            head = (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
                    + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
                    + "Docker-Distribution-API-Version: registry/2.0\r\n"
                    + f"Content-Length: {len(body)}\r\n"
                    + ("" if keep else "Connection: close\r\n") + "\r\n")
            self.wfile.write(head.encode("latin-1") + (b"" if method == "HEAD" else body))
            if not keep:
                return
