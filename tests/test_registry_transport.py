"""The registry client's GETs skip requests' Session but keep what it decided: an HTTP
proxy from the environment (and NO_PROXY), and the names of its failures in messages."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from pipeline.errors import NotFound, TransientError
from pipeline.reference import Reference
from pipeline.registry import DockerConfig, RegistryClient
from pipeline.retry import RetryPolicy


class ForwardProxy:
    """Accepts HTTP proxy requests, records each request line, answers 404 to all."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with conn, conn.makefile("rb") as f:
                while line := f.readline():
                    self.lines.append(line.decode().strip())
                    while f.readline() not in (b"\r\n", b""):
                        pass
                    conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")

    def close(self) -> None:
        self._sock.close()


@pytest.fixture
def proxy(monkeypatch: pytest.MonkeyPatch) -> Iterator[ForwardProxy]:
    p = ForwardProxy()
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "NO_PROXY",
                 "no_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", p.url)
    yield p
    p.close()


def _client(**kw: object) -> RegistryClient:
    return RegistryClient(docker_config=DockerConfig(), sleep=lambda s: None,
                          retry=RetryPolicy(attempts=1), **kw)  # type: ignore[arg-type]


def test_a_plain_http_registry_is_asked_through_the_environments_proxy(
    proxy: ForwardProxy,
) -> None:
    c = _client(insecure_registries=["registry.invalid:5000"])
    with pytest.raises(NotFound):
        c.fetch_manifest(Reference("registry.invalid:5000", "team/app", "v1"))
    assert proxy.lines == ["GET http://registry.invalid:5000/v2/team/app/manifests/v1 HTTP/1.1"]


def test_no_proxy_sends_the_registry_its_requests_directly(
    proxy: ForwardProxy, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("NO_PROXY", "registry.invalid")
    c = _client(insecure_registries=["registry.invalid:5000"])
    with pytest.raises(TransientError, match="ConnectionError talking to registry.invalid:5000"):
        c.fetch_manifest(Reference("registry.invalid:5000", "team/app", "v1"))
    assert proxy.lines == []
