"""RegistryClient against a real docker-registry (plain, htpasswd, and bearer-token auth).

Faults come from the counting proxy in front of the registry; a tiny local HTTP(S) server
records what a redirect target receives. Backoff waits are recorded, never slept.
"""

from __future__ import annotations

import base64
import json
import logging
import ssl
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from pipeline.digest import Digest
from pipeline.errors import (
    DigestMismatch,
    InvalidManifest,
    NotFound,
    PermanentError,
    TransientError,
    Unauthorized,
)
from pipeline.manifest import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    MANIFEST_TYPES,
    OCI_INDEX,
    OCI_MANIFEST,
    parse_manifest,
)
from pipeline.reference import Reference
from pipeline.registry import DockerConfig, RegistryClient
from pipeline.retry import RetryPolicy
from tests.support.images import Image, Layer, Platform, random_tar
from tests.support.proxy import Proxy
from tests.support.registry import RegistryServer
from tests.support.token_server import TokenServer, self_signed_cert

PASSWORD = "s3cret-pw"
SECRET_FORMS = (PASSWORD, base64.b64encode(f"alice:{PASSWORD}".encode()).decode())
BLOB_PATH = r"/v2/client/oci/blobs/sha256:"


class Sleeps(list):
    """An injectable `sleep` that records the waits instead of sleeping."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def client(sleeps: Sleeps | None = None, **kw: object) -> RegistryClient:
    kw.setdefault("docker_config", DockerConfig())
    return RegistryClient(sleep=sleeps if sleeps is not None else Sleeps(), **kw)


def creds_config(host: str, user: str = "alice", password: str = PASSWORD) -> DockerConfig:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return DockerConfig({"auths": {host: {"auth": token}}})


@pytest.fixture(scope="module")
def image() -> Image:
    return Image(layers=[Layer(random_tar(11, 300_000)), Layer(random_tar(12, 2_000), "zstd")])


@pytest.fixture(scope="module")
def pushed(registry: RegistryServer, image: Image) -> dict[str, str]:
    """OCI and Docker images, and both kinds of index, pushed once for this module."""
    docker = Image(layers=image.layers, format="docker")
    arm = Image(layers=image.layers[:1], platform=Platform("linux", "arm64"))
    return {
        "oci": registry.push_image("client/oci", "v1", image),
        "docker": registry.push_image("client/docker", "v1", docker),
        "oci-index": registry.push_index("client/index", "oci", [image, arm], "oci"),
        "docker-list": registry.push_index(
            "client/index", "docker", [docker, Image(arm.layers, arm.platform, "docker")], "docker"
        ),
    }


def ref(host: str, name: str) -> Reference:
    return Reference.parse(f"{host}/{name}")


# ---------------------------------------------------------------- a recording HTTP(S) server


class Recorder:
    """Answers every GET with `status`/`headers`/`body` and records the request headers."""

    def __init__(
        self,
        body: bytes = b"",
        status: int = 200,
        headers: dict | None = None,
        tls_dir: Path | None = None,
    ) -> None:
        self.body, self.status, self.headers = body, status, headers or {}
        self.seen: list[tuple[str, dict[str, str]]] = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                recorder.seen.append((self.path, dict(self.headers.items())))
                self.send_response(recorder.status)
                for key, value in recorder.headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(recorder.body)))
                self.end_headers()
                self.wfile.write(recorder.body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        scheme = "http"
        if tls_dir is not None:  # self-signed: a verifying client must refuse it
            key = ec.generate_private_key(ec.SECP256R1())
            cert = self_signed_cert(key, "untrusted", ip="127.0.0.1")
            (tls_dir / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
            (tls_dir / "key.pem").write_bytes(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(tls_dir / "cert.pem", tls_dir / "key.pem")
            self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
            scheme = "https"
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        self.url = f"{scheme}://{self.host}"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    rec = Recorder()
    yield rec
    rec.close()


# ---------------------------------------------------------------- manifests


def test_scheme_is_https_except_loopback_and_listed_insecure() -> None:
    c = client(insecure_registries=["reg.lan:5000"])
    assert c._base_url(Reference.parse("alpine")) == "https://registry-1.docker.io"
    assert c._base_url(Reference.parse("ghcr.io/a/b")) == "https://ghcr.io"
    assert c._base_url(Reference.parse("reg.lan:5001/a")) == "https://reg.lan:5001"
    assert c._base_url(Reference.parse("reg.lan:5000/a")) == "http://reg.lan:5000"
    assert c._base_url(Reference.parse("localhost:5000/a")) == "http://localhost:5000"
    assert c._base_url(Reference.parse("127.0.0.1:5000/a")) == "http://127.0.0.1:5000"


def test_manifest_request_sends_every_accepted_type(recorder: Recorder, image: Image) -> None:
    recorder.body = image.manifest_bytes()
    recorder.headers = {"Content-Type": OCI_MANIFEST + "; charset=utf-8"}
    fetched = client().fetch_manifest(ref(recorder.host, "team/app:v1"))
    path, headers = recorder.seen[0]
    assert path == "/v2/team/app/manifests/v1"
    assert [t.strip() for t in headers["Accept"].split(",")] == list(MANIFEST_TYPES)
    assert fetched.media_type == OCI_MANIFEST
    assert fetched.digest == Digest.parse(image.manifest_digest)


@pytest.mark.parametrize(
    ("repo", "key", "media_type"),
    [
        ("client/oci:v1", "oci", OCI_MANIFEST),
        ("client/docker:v1", "docker", DOCKER_MANIFEST),
        ("client/index:oci", "oci-index", OCI_INDEX),
        ("client/index:docker", "docker-list", DOCKER_LIST),
    ],
)
def test_fetch_manifest_kinds(
    registry: RegistryServer, pushed: dict[str, str], repo: str, key: str, media_type: str
) -> None:
    with client() as c:
        fetched = c.fetch_manifest(ref(registry.host, repo))
        assert fetched.media_type == media_type
        assert fetched.digest == Digest.parse(pushed[key])  # Docker schema 2 is not converted
        again = c.fetch_manifest(ref(registry.host, repo.split(":")[0] + "@" + pushed[key]))
        assert again.data == fetched.data
        parsed = parse_manifest(fetched.data, fetched.media_type)
        if media_type in (OCI_INDEX, DOCKER_LIST):  # children resolve by digest
            for child in parsed.manifests:
                sub = c.fetch_manifest(ref(registry.host, f"client/index@{child.digest}"))
                assert sub.digest == child.digest


def test_accept_header_decides_what_the_registry_serves(
    registry: RegistryServer, pushed: dict[str, str]
) -> None:
    with pytest.raises(NotFound, match=r"manifest v1 not found in 127\.0\.0\.1:\d+/client/oci"):
        client().fetch_manifest(ref(registry.host, "client/oci:v1"), accept=[DOCKER_MANIFEST])


def test_manifest_by_digest_is_verified(registry_proxy: Proxy, pushed: dict[str, str]) -> None:
    forged = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": []}).encode()
    registry_proxy.override(r"/manifests/sha256:", 200, forged, {"Content-Type": OCI_MANIFEST})
    sleeps = Sleeps()
    with pytest.raises(DigestMismatch) as info:
        client(sleeps).fetch_manifest(ref(registry_proxy.host, "client/oci@" + pushed["oci"]))
    assert pushed["oci"] in str(info.value)
    assert str(Digest.of_bytes(forged)) in str(info.value)
    assert sleeps == [] and registry_proxy.count("GET", "/manifests/") == 1


def test_tag_fetch_checks_docker_content_digest(registry_proxy: Proxy, image: Image) -> None:
    other = "sha256:" + "0" * 64
    registry_proxy.override(
        r"/manifests/v1",
        200,
        image.manifest_bytes(),
        {"Content-Type": OCI_MANIFEST, "Docker-Content-Digest": other},
    )
    with pytest.raises(DigestMismatch, match=other):
        client().fetch_manifest(ref(registry_proxy.host, "client/oci:v1"))


def test_manifest_size_limit(registry_proxy: Proxy, pushed: dict[str, str]) -> None:
    with pytest.raises(InvalidManifest, match="larger than 100 bytes"):
        client().fetch_manifest(ref(registry_proxy.host, "client/oci:v1"), max_bytes=100)


def test_not_found_messages_name_registry_repository_and_object(registry: RegistryServer) -> None:
    c = client()
    with pytest.raises(NotFound) as info:
        c.fetch_manifest(ref(registry.host, "team/app:nope"))
    assert f"manifest nope not found in {registry.host}/team/app" in str(info.value)
    missing = Digest.of_bytes(b"missing")
    with pytest.raises(NotFound) as info:
        c.fetch_blob(ref(registry.host, "team/app"), missing)
    assert f"blob {missing} not found in {registry.host}/team/app" in str(info.value)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------- blobs


def test_fetch_blob_verified(registry_proxy: Proxy, pushed: dict[str, str], image: Image) -> None:
    r, config = ref(registry_proxy.host, "client/oci"), Digest.parse(image.config_digest)
    assert client().fetch_blob(r, config) == image.config_bytes()
    registry_proxy.flip_byte(BLOB_PATH, offset=5)
    with pytest.raises(DigestMismatch) as info:
        client().fetch_blob(r, config)
    assert str(config) in str(info.value) and "got sha256:" in str(info.value)


def test_fetch_blob_size_limit(
    registry: RegistryServer, pushed: dict[str, str], image: Image
) -> None:
    layer = Digest.parse(image.layers[0].digest)
    with pytest.raises(InvalidManifest, match="larger than 1000 bytes"):
        client().fetch_blob(ref(registry.host, "client/oci"), layer, max_bytes=1000)


def test_open_blob_whole_and_from_offset(
    registry: RegistryServer, pushed: dict[str, str], image: Image
) -> None:
    layer = image.layers[0]
    r, digest = ref(registry.host, "client/oci"), Digest.parse(layer.digest)
    with client() as c:
        with c.open_blob(r, digest) as stream:
            assert (stream.offset, stream.length) == (0, layer.size)
            assert b"".join(stream.iter_chunks(4096)) == layer.blob
        with c.open_blob(r, digest, offset=1000) as stream:
            assert (stream.offset, stream.length) == (1000, layer.size)
            assert b"".join(stream.iter_chunks()) == layer.blob[1000:]


def test_open_blob_when_server_ignores_range(registry_proxy: Proxy, image: Image) -> None:
    layer = image.layers[1]
    registry_proxy.override(
        BLOB_PATH, 200, layer.blob, {"Content-Type": "application/octet-stream"}
    )
    r = ref(registry_proxy.host, "client/oci")
    with client().open_blob(r, Digest.parse(layer.digest), offset=10) as stream:
        assert (stream.offset, stream.length) == (0, layer.size)
        assert b"".join(stream.iter_chunks()) == layer.blob


def test_cut_stream_raises_transient_and_resumes_with_range(
    registry_proxy: Proxy, pushed: dict[str, str], image: Image
) -> None:
    layer = image.layers[0]
    r, digest = ref(registry_proxy.host, "client/oci"), Digest.parse(layer.digest)
    registry_proxy.reset_after(BLOB_PATH, 100_000)
    got = bytearray()
    with client() as c:
        with pytest.raises(TransientError, match="connection lost"):
            with c.open_blob(r, digest) as stream:
                for chunk in stream.iter_chunks(8192):
                    got += chunk
        assert 0 < len(got) <= 100_000
        with c.open_blob(r, digest, offset=len(got)) as stream:
            assert stream.offset == len(got)
            got += b"".join(stream.iter_chunks())
    assert bytes(got) == layer.blob


# ---------------------------------------------------------------- retries


def test_retry_after_is_honoured(registry_proxy: Proxy, pushed: dict[str, str]) -> None:
    registry_proxy.fail(r"/manifests/v1", 429, times=1, headers={"Retry-After": "2"})
    sleeps = Sleeps()
    client(sleeps).fetch_manifest(ref(registry_proxy.host, "client/oci:v1"))
    assert len(sleeps) == 1 and sleeps[0] >= 2
    assert registry_proxy.count("GET", r"/manifests/v1") == 2


def test_server_errors_retried_with_growing_backoff(
    registry_proxy: Proxy, pushed: dict[str, str], image: Image
) -> None:
    registry_proxy.fail(BLOB_PATH, 500, times=3)
    sleeps = Sleeps()
    data = client(sleeps).fetch_blob(
        ref(registry_proxy.host, "client/oci"), Digest.parse(image.config_digest)
    )
    assert data == image.config_bytes()
    assert len(sleeps) == 3
    for n, wait in enumerate(sleeps):  # 0.5 s doubling, jittered down to half
        assert 0.5 * 2**n / 2 <= wait <= 0.5 * 2**n


def test_retries_give_up_with_transient_error(registry_proxy: Proxy, pushed: dict) -> None:
    body = json.dumps({"errors": [{"code": "UNAVAILABLE", "message": "try later"}]}).encode()
    registry_proxy.fail(r"/manifests/", 503, times=None, body=body)
    sleeps = Sleeps()
    with pytest.raises(TransientError) as info:
        client(sleeps, retry=RetryPolicy(attempts=3)).fetch_manifest(
            ref(registry_proxy.host, "client/oci:v1"))
    message = str(info.value)
    assert "HTTP 503 UNAVAILABLE: try later" in message and registry_proxy.host in message
    assert len(sleeps) == 2 and registry_proxy.count("GET", "/manifests/") == 3


def test_permanent_errors_are_not_retried(registry_proxy: Proxy) -> None:
    sleeps = Sleeps()
    with pytest.raises(NotFound):
        client(sleeps).fetch_manifest(ref(registry_proxy.host, "client/absent:v1"))
    assert sleeps == [] and registry_proxy.count("GET", "/manifests/") == 1


def test_connection_refused_is_transient() -> None:
    sleeps = Sleeps()
    dead = Proxy("http://127.0.0.1:9")
    dead.stop()  # its port is now closed
    with pytest.raises(TransientError, match=dead.host):
        client(sleeps, retry=RetryPolicy(attempts=2)).fetch_manifest(ref(dead.host, "a/b:v1"))
    assert len(sleeps) == 1


# ---------------------------------------------------------------- redirects


def test_redirect_to_other_host_drops_authorization(
    registry_proxy: Proxy, recorder: Recorder, image: Image, caplog: pytest.LogCaptureFixture
) -> None:
    layer = image.layers[1]
    recorder.body = layer.blob
    # The registry (proxy) demands basic auth once, then redirects the blob to "storage".
    registry_proxy.override(BLOB_PATH, 401, b"{}", {"WWW-Authenticate": 'Basic realm="r"'}, times=1)
    registry_proxy.override(BLOB_PATH, 307, b"", {"Location": f"{recorder.url}/storage/blob"})
    caplog.set_level(logging.DEBUG)
    c = client(docker_config=creds_config(registry_proxy.host))
    with c.open_blob(ref(registry_proxy.host, "client/oci"), Digest.parse(layer.digest)) as s:
        assert b"".join(s.iter_chunks()) == layer.blob
    assert registry_proxy.count("GET", BLOB_PATH) == 2  # the 401, then the authorized 307
    [(path, headers)] = recorder.seen
    assert path == "/storage/blob"
    assert "authorization" not in {k.lower() for k in headers}
    assert not any(secret in caplog.text for secret in SECRET_FORMS)


def test_redirect_to_file_url_refused(registry_proxy: Proxy, image: Image) -> None:
    registry_proxy.override(BLOB_PATH, 302, b"", {"Location": "file:///etc/passwd"})
    sleeps = Sleeps()
    with pytest.raises(PermanentError, match="non-HTTP URL"):
        client(sleeps).fetch_blob(
            ref(registry_proxy.host, "client/oci"), Digest.parse(image.config_digest)
        )
    assert sleeps == []


def test_redirect_loop_stops_after_five_hops(registry_proxy: Proxy, image: Image) -> None:
    registry_proxy.override(
        BLOB_PATH,
        302,
        b"",
        {"Location": f"{registry_proxy.url}/v2/client/oci/blobs/{image.config_digest}"},
    )
    with pytest.raises(PermanentError, match="more than 5 redirects"):
        client().fetch_blob(
            ref(registry_proxy.host, "client/oci"), Digest.parse(image.config_digest)
        )
    assert registry_proxy.count("GET", BLOB_PATH) == 6


def test_https_redirect_target_with_untrusted_certificate_refused(
    registry_proxy: Proxy, image: Image, tmp_path: Path
) -> None:
    tls = Recorder(b"whatever", tls_dir=tmp_path)
    try:
        registry_proxy.override(BLOB_PATH, 307, b"", {"Location": f"{tls.url}/blob"})
        sleeps = Sleeps()
        with pytest.raises(PermanentError, match="TLS certificate .* failed verification"):
            client(sleeps).fetch_blob(
                ref(registry_proxy.host, "client/oci"), Digest.parse(image.config_digest)
            )
        assert sleeps == [] and tls.seen == []
    finally:
        tls.close()


# ---------------------------------------------------------------- htpasswd (basic auth)


@pytest.fixture(scope="module")
def auth_pushed(auth_registry: RegistryServer, image: Image) -> str:
    return auth_registry.push_image("private/app", "v1", image)


def test_basic_auth_with_docker_config(
    auth_registry: RegistryServer,
    auth_pushed: str,
    docker_config: Path,
    image: Image,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    config = DockerConfig.load({"DOCKER_CONFIG": str(docker_config)})
    r = ref(auth_registry.host, "private/app:v1")
    with client(docker_config=config) as c:
        assert c.fetch_manifest(r).digest == Digest.parse(auth_pushed)
        assert c.fetch_blob(r, Digest.parse(image.config_digest)) == image.config_bytes()
    assert not any(secret in caplog.text for secret in SECRET_FORMS)


def test_basic_auth_without_or_with_wrong_credentials(
    auth_registry: RegistryServer, auth_pushed: str
) -> None:
    r = ref(auth_registry.host, "private/app:v1")
    sleeps = Sleeps()
    with pytest.raises(Unauthorized, match="no credentials for 127.0.0.1"):
        client(sleeps).fetch_manifest(r)
    wrong = creds_config(auth_registry.host, password="wrong-pw-123")
    with pytest.raises(Unauthorized) as info:
        client(sleeps, docker_config=wrong).fetch_manifest(r)
    message = str(info.value)
    assert "user 'alice'" in message and auth_registry.host in message
    assert "wrong-pw-123" not in message and "wrong-pw-123" not in repr(info.value)
    assert sleeps == []


# ---------------------------------------------------------------- bearer tokens


@pytest.fixture(scope="module")
def token_registry(image: Image) -> Iterator[tuple[RegistryServer, TokenServer]]:
    """docker-registry with `auth.token` trusting our token server; two repos pushed."""
    tokens = TokenServer(refresh_tokens={"idtoken-for-alice": "alice"})
    server = RegistryServer(extra_config=tokens.registry_config())
    try:
        try:
            server.start()
        except Exception as exc:  # fail (never skip) naming the service
            pytest.fail(str(exc), pytrace=False)
        access = [
            {"type": "repository", "name": name, "actions": ["pull", "push"]}
            for name in ("public/app", "private/app")
        ]
        server.session.headers["Authorization"] = "Bearer " + tokens.mint("pusher", access)
        server.push_image("public/app", "v1", image)
        server.push_image("private/app", "v1", image)
        yield server, tokens
    finally:
        server.cleanup()
        tokens.stop()


def test_anonymous_token_for_public_repo_is_cached(
    token_registry: tuple[RegistryServer, TokenServer], image: Image
) -> None:
    server, tokens = token_registry
    tokens.reset()
    r = ref(server.host, "public/app:v1")
    with client() as c:
        assert c.fetch_manifest(r).digest == Digest.parse(image.manifest_digest)
        assert c.fetch_blob(r, Digest.parse(image.config_digest)) == image.config_bytes()
        with c.open_blob(r, Digest.parse(image.layers[0].digest), offset=7) as stream:
            assert b"".join(stream.iter_chunks()) == image.layers[0].blob[7:]
    [asked] = tokens.requests_log  # one token for the scope, reused for every request
    assert (asked.method, asked.subject, asked.scopes) == (
        "GET",
        None,
        ("repository:public/app:pull",),
    )


def test_token_fetched_once_by_many_threads(
    token_registry: tuple[RegistryServer, TokenServer], image: Image
) -> None:
    server, tokens = token_registry
    tokens.reset()
    r = ref(server.host, "public/app:v1")
    with client() as c, ThreadPoolExecutor(16) as pool:
        digests = set(pool.map(lambda _: c.fetch_manifest(r).digest, range(32)))
    assert digests == {Digest.parse(image.manifest_digest)}
    assert len(tokens.requests_log) == 1


def test_credentialed_token_via_docker_config(
    token_registry: tuple[RegistryServer, TokenServer],
    image: Image,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server, tokens = token_registry
    tokens.reset()
    caplog.set_level(logging.DEBUG)
    r = ref(server.host, "private/app:v1")
    with client(docker_config=creds_config(server.host)) as c:
        assert c.fetch_manifest(r).digest == Digest.parse(image.manifest_digest)
    assert [(t.method, t.subject) for t in tokens.requests_log] == [("GET", "alice")]
    assert not any(secret in caplog.text for secret in SECRET_FORMS)


def test_identity_token_uses_oauth_refresh_grant(
    token_registry: tuple[RegistryServer, TokenServer], image: Image
) -> None:
    server, tokens = token_registry
    tokens.reset()
    config = DockerConfig({"auths": {server.host: {"identitytoken": "idtoken-for-alice"}}})
    fetched = client(docker_config=config).fetch_manifest(ref(server.host, "private/app:v1"))
    assert fetched.digest == Digest.parse(image.manifest_digest)
    assert [(t.method, t.subject) for t in tokens.requests_log] == [("POST", "alice")]


def test_denied_pull_is_unauthorized(token_registry: tuple[RegistryServer, TokenServer]) -> None:
    server, _tokens = token_registry
    r = ref(server.host, "private/app:v1")
    sleeps = Sleeps()
    with pytest.raises(Unauthorized) as info:
        client(sleeps).fetch_manifest(r)  # anonymous token without pull on private/
    assert f"{server.host}/private/app" in str(info.value) and "anonymously" in str(info.value)
    wrong = creds_config(server.host, password="not-the-pw")
    with pytest.raises(Unauthorized, match="token server .* refused user 'alice'") as info:
        client(sleeps, docker_config=wrong).fetch_manifest(r)
    assert "not-the-pw" not in str(info.value)
    assert sleeps == []


def test_rejected_cached_token_is_replaced(
    token_registry: tuple[RegistryServer, TokenServer], image: Image
) -> None:
    server, tokens = token_registry
    r_path = r"/v2/public/app/manifests/v1"
    with Proxy(server.url) as proxy, client() as c:
        r = ref(proxy.host, "public/app:v1")
        c.fetch_manifest(r)
        tokens.reset()
        # As if the cached token had been revoked: the next request is challenged again.
        challenge = (f'Bearer realm="{tokens.realm}",service="{tokens.service}",'
                     'scope="repository:public/app:pull"')
        proxy.fail(r_path, 401, times=1, headers={"WWW-Authenticate": challenge})
        assert c.fetch_manifest(r).digest == Digest.parse(image.manifest_digest)
        assert proxy.count("GET", r_path) == 4  # 401 + 200 at first, then the 401 + retry
    assert len(tokens.requests_log) == 1  # a fresh token, not the rejected one again
