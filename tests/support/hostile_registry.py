"""A small registry that misbehaves on purpose: crafted documents, trickled answers, redirects.

`HostileRegistry` is a stdlib HTTP server on a free port of a loopback address. It answers
only the paths it was told about (`serve`, or `serve_image` for a whole honest image) and
404 to everything else, and it logs every request as it arrives, so a test can count what
the client asked for, including requests whose answer never finished.

An `Answer` can trickle its body (or its status line and headers as well): `step` bytes
every `trickle` seconds. The pacing waits on the server's stop event, so `close()` ends every
trickle at once.

`plain_http_name()` finds a host name that resolves to a loopback address but is not a
loopback *name* to layerwarm's plain-HTTP rule (only `localhost` and IP literals are), e.g.
the machine's own host name listed in /etc/hosts: a server listening there is reachable,
and plain HTTP to it is what the rule must refuse.
"""

from __future__ import annotations

import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tests.support.images import OCI_INDEX, Image, canonical_json, sha256_digest


@dataclass(frozen=True)
class Answer:
    """What one path answers: status, headers, body, and how slowly."""

    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    trickle: float | None = None   # seconds between steps of the body (None: all at once)
    step: int = 1                  # bytes sent at each step of a trickle
    trickle_head: bool = False     # the status line and headers trickle too (a byte a step)

    @classmethod
    def redirect(cls, location: str, status: int = 307) -> Answer:
        return cls(status, headers={"Location": location})


class HostileRegistry:
    """A registry API on `bind` (a loopback address), answering what it was told to."""

    def __init__(self, bind: str = "127.0.0.1") -> None:
        self._answers: dict[str, Answer] = {}
        self._hits: list[str] = []
        self._lock = threading.Lock()
        self.stopped = threading.Event()
        self._server = ThreadingHTTPServer((bind, 0), _Handler)
        self._server.daemon_threads = True
        self._server.registry = self  # type: ignore[attr-defined]
        self.bind = bind
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @property
    def host(self) -> str:
        return f"{self.bind}:{self.port}"

    def close(self) -> None:
        """Stop serving (use `contextlib.closing`); every trickle ends at once."""
        self.stopped.set()
        self._server.shutdown()
        self._server.server_close()

    # ------------------------------------------------------------ what it serves

    def serve(self, path: str, answer: Answer) -> None:
        """Answer GETs of `path` (exact, without query) with `answer`."""
        with self._lock:
            self._answers[path] = answer

    def serve_image(self, repo: str, tag: str, image: Image) -> None:
        """An honest image: manifest by tag and by digest, config and layer blobs."""
        manifest = image.manifest_bytes()
        headers = {"Content-Type": image.manifest_media_type,
                   "Docker-Content-Digest": image.manifest_digest}
        for ref in (tag, image.manifest_digest):
            self.serve(f"/v2/{repo}/manifests/{ref}", Answer(200, manifest, headers))
        self.serve_blob(repo, image.config_bytes())
        for layer in image.layers:
            self.serve_blob(repo, layer.blob)

    def serve_blob(self, repo: str, data: bytes, **how: object) -> str:
        """`data` as a blob of `repo` (`how`: Answer fields); returns its digest."""
        digest = sha256_digest(data)
        self.serve(f"/v2/{repo}/blobs/{digest}", Answer(200, data, **how))  # type: ignore[arg-type]
        return digest

    def serve_index(self, repo: str, tag: str, entries: list[dict[str, object]]) -> bytes:
        """An OCI index of `entries` (descriptors) at `repo:tag`; returns its bytes."""
        body = canonical_json({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries})
        self.serve(f"/v2/{repo}/manifests/{tag}", Answer(200, body, {"Content-Type": OCI_INDEX}))
        return body

    def served(self, path: str) -> Answer:
        """What `path` answers (a 404 unless told otherwise); not counted as a request."""
        with self._lock:
            return self._answers.get(path.split("?", 1)[0], Answer(404, b"{}"))

    def answer_for(self, path: str) -> Answer:
        """What the server sends for a request of `path`: logged, then answered."""
        with self._lock:
            self._hits.append(path)
        return self.served(path)

    # ------------------------------------------------------------ what it was asked

    @property
    def hits(self) -> list[str]:
        with self._lock:
            return list(self._hits)

    def count(self, path_regex: str = r"") -> int:
        pattern = re.compile(path_regex)
        return sum(1 for p in self.hits if pattern.search(p))


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: ThreadingHTTPServer

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        registry: HostileRegistry = self.server.registry  # type: ignore[attr-defined]
        answer = registry.answer_for(self.path)
        head = [f"HTTP/1.1 {answer.status} {self.responses.get(answer.status, ('',))[0]}"]
        head += [f"{k}: {v}" for k, v in answer.headers.items()]
        head += [f"Content-Length: {len(answer.body)}", "", ""]
        raw_head = "\r\n".join(head).encode("latin-1")
        try:
            if answer.trickle is None:  # one write: a second small one waits for a delayed ACK
                self._send(raw_head + answer.body, None, 1, registry)
                return
            self._send(raw_head, answer.trickle if answer.trickle_head else None, 1, registry)
            self._send(answer.body, answer.trickle, answer.step, registry)
        except OSError:  # the client gave up (as it should, on a trickle)
            self.close_connection = True

    def _send(
        self, data: bytes, trickle: float | None, step: int, registry: HostileRegistry,
    ) -> None:
        if trickle is None:
            self.wfile.write(data)
            return
        for i in range(0, len(data), step):
            self.wfile.write(data[i:i + step])
            self.wfile.flush()
            if registry.stopped.wait(trickle):
                raise OSError("server stopped")

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass


def plain_http_name() -> tuple[str, str]:
    """A host name that resolves to a loopback address without being `localhost` or an IP
    literal; returns (name, address). None such is a broken test machine: say so."""
    for name in (socket.gethostname(), "localhost.localdomain", "ip6-localhost"):
        try:
            address = socket.gethostbyname(name)
        except OSError:
            continue
        if name.lower() != "localhost" and address.startswith("127."):
            return name, address
    raise RuntimeError("no host name other than 'localhost' resolves to a loopback address "
                       "here; add one to /etc/hosts (e.g. '127.0.0.1 vm') for this test")
