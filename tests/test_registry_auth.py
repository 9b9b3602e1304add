"""Unit tests for registry credentials: Docker config, credential helpers, challenges,
and where credentials may be sent.

Fast and offline: config files and a fake `docker-credential-fake` helper live in tmp dirs;
the token realm is a recording HTTP server on 127.0.0.1.
"""

from __future__ import annotations

import base64
import json
import os
import stat
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from pipeline.errors import UsageError
from pipeline.registry.auth import Authenticator, parse_challenges
from pipeline.registry.client import RegistryClient, parse_retry_after, plain_http_allowed
from pipeline.registry.credentials import Credentials, DockerConfig


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def write_config(tmp_path: Path, data: object) -> dict[str, str]:
    (tmp_path / "config.json").write_text(json.dumps(data))
    return {"DOCKER_CONFIG": str(tmp_path)}


@pytest.fixture
def fake_helper(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """`docker-credential-fake` on PATH: answers from a JSON file, logs what it was asked."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    store = tmp_path / "helper-store.json"
    store.write_text("{}")
    script = bindir / "docker-credential-fake"
    script.write_text(
        "#!/usr/bin/env python3\n"
        "import json, sys\n"
        f"store = json.load(open({str(store)!r}))\n"
        "server = sys.stdin.read().strip()\n"
        f"log = open({str(tmp_path / 'helper-asked.log')!r}, 'a')\n"
        "log.write(sys.argv[1] + ' ' + server + '\\n')\n"
        "if server not in store:\n"
        "    print('credentials not found in native keychain'); sys.exit(1)\n"
        "print(json.dumps({'ServerURL': server, **store[server]}))\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    return store


def helper_asked(tmp_path: Path) -> list[str]:
    log = tmp_path / "helper-asked.log"
    return log.read_text().splitlines() if log.exists() else []


# ---------------------------------------------------------------- loading


def test_missing_config_is_empty(tmp_path: Path) -> None:
    config = DockerConfig.load({"DOCKER_CONFIG": str(tmp_path / "nope")})
    assert config.credentials_for("registry.example.com") is None


def test_home_docker_config_used_without_docker_config_env(tmp_path: Path) -> None:
    (tmp_path / ".docker").mkdir()
    write_config(tmp_path / ".docker", {"auths": {"r.example": {"auth": b64("u:p")}}})
    creds = DockerConfig.load({"HOME": str(tmp_path)}).credentials_for("r.example")
    assert creds == Credentials("u", "p")


def test_malformed_json_names_file_but_not_content(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"auths": {"x": {"auth": "c2VjcmV0LXZhbHVl"}')
    with pytest.raises(UsageError) as info:
        DockerConfig.load({"DOCKER_CONFIG": str(tmp_path)})
    assert str(tmp_path / "config.json") in str(info.value)
    assert "c2VjcmV0LXZhbHVl" not in str(info.value)


def test_non_object_config_is_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="not a JSON object"):
        DockerConfig.load(write_config(tmp_path, ["auths"]))


# ---------------------------------------------------------------- auths


def test_auths_auth_field_password_may_contain_colons(tmp_path: Path) -> None:
    env = write_config(tmp_path, {"auths": {"127.0.0.1:5000": {"auth": b64("bob:pa:ss")}}})
    assert DockerConfig.load(env).credentials_for("127.0.0.1:5000") == Credentials("bob", "pa:ss")


def test_auths_username_password_and_identity_token(tmp_path: Path) -> None:
    env = write_config(
        tmp_path,
        {
            "auths": {
                "a.example": {"username": "carol", "password": "pw"},
                "b.example": {"auth": b64("dave:x"), "identitytoken": "refresh-123"},
            }
        },
    )
    config = DockerConfig.load(env)
    assert config.credentials_for("a.example") == Credentials("carol", "pw")
    token = config.credentials_for("b.example")
    assert token == Credentials("<token>", "refresh-123") and token.is_identity_token


@pytest.mark.parametrize("key", ["https://r.example", "http://r.example", "https://r.example/v2/"])
def test_auths_keys_with_scheme_match_host(tmp_path: Path, key: str) -> None:
    env = write_config(tmp_path, {"auths": {key: {"auth": b64("u:p")}}})
    config = DockerConfig.load(env)
    assert config.credentials_for("r.example") == Credentials("u", "p")
    assert config.credentials_for("r.example:5000") is None
    assert config.credentials_for("other.example") is None


@pytest.mark.parametrize(
    "key", ["https://index.docker.io/v1/", "docker.io", "index.docker.io", "registry-1.docker.io"]
)
@pytest.mark.parametrize("registry", ["docker.io", "registry-1.docker.io"])
def test_docker_hub_aliases(tmp_path: Path, key: str, registry: str) -> None:
    env = write_config(tmp_path, {"auths": {key: {"auth": b64("hubuser:hubpw")}}})
    assert DockerConfig.load(env).credentials_for(registry) == Credentials("hubuser", "hubpw")


def test_exact_key_wins_over_alias(tmp_path: Path) -> None:
    env = write_config(
        tmp_path,
        {
            "auths": {
                "docker.io": {"auth": b64("alias:1")},
                "https://index.docker.io/v1/": {"auth": b64("exact:2")},
            }
        },
    )
    assert DockerConfig.load(env).credentials_for("docker.io").username == "exact"


def test_bad_base64_auth_is_usage_error_without_secret(tmp_path: Path) -> None:
    env = write_config(tmp_path, {"auths": {"r.example": {"auth": "bm9jb2xvbg=="}}})  # "nocolon"
    with pytest.raises(UsageError, match="r.example") as info:
        DockerConfig.load(env).credentials_for("r.example")
    assert "nocolon" not in str(info.value) and "bm9jb2xvbg" not in str(info.value)


# ---------------------------------------------------------------- credential helpers


def test_cred_helper_for_registry(tmp_path: Path, fake_helper: Path) -> None:
    fake_helper.write_text(json.dumps({"r.example:5000": {"Username": "h", "Secret": "hs"}}))
    env = write_config(
        tmp_path,
        {
            "credHelpers": {"r.example:5000": "fake"},
            "auths": {"r.example:5000": {"auth": b64("from:auths")}},
        },
    )
    assert DockerConfig.load(env).credentials_for("r.example:5000") == Credentials("h", "hs")
    assert helper_asked(tmp_path) == ["get r.example:5000"]


def test_cred_helper_not_found_means_anonymous(tmp_path: Path, fake_helper: Path) -> None:
    env = write_config(tmp_path, {"credHelpers": {"r.example": "fake"}})
    assert DockerConfig.load(env).credentials_for("r.example") is None


def test_creds_store_then_auths_fallback(tmp_path: Path, fake_helper: Path) -> None:
    fake_helper.write_text(
        json.dumps(
            {
                "https://index.docker.io/v1/": {"Username": "<token>", "Secret": "idtok"},
            }
        )
    )
    env = write_config(
        tmp_path,
        {
            "credsStore": "fake",
            "auths": {"r.example": {"auth": b64("plain:pw")}},
        },
    )
    config = DockerConfig.load(env)
    hub = config.credentials_for("docker.io")
    assert hub == Credentials("<token>", "idtok") and hub.is_identity_token
    assert config.credentials_for("r.example") == Credentials("plain", "pw")
    # Docker Hub is looked up in helpers under its historical server URL.
    assert helper_asked(tmp_path) == ["get https://index.docker.io/v1/", "get r.example"]


def test_missing_helper_is_usage_error(tmp_path: Path) -> None:
    env = write_config(tmp_path, {"credsStore": "does-not-exist-here"})
    with pytest.raises(UsageError, match="docker-credential-does-not-exist-here not found"):
        DockerConfig.load(env).credentials_for("r.example")


def test_helper_name_cannot_inject_paths(tmp_path: Path) -> None:
    env = write_config(tmp_path, {"credHelpers": {"r.example": "../../bin/sh"}})
    with pytest.raises(UsageError, match="invalid credential helper name"):
        DockerConfig.load(env).credentials_for("r.example")


# ---------------------------------------------------------------- secrets stay secret


def test_credentials_repr_hides_secret() -> None:
    creds = Credentials("alice", "s3cret-pw")
    for text in (repr(creds), str(creds), f"{creds}", creds.describe()):
        assert "s3cret-pw" not in text
    assert "alice" in repr(creds)


# ---------------------------------------------------------------- challenges


def test_parse_bearer_challenge_with_comma_in_scope() -> None:
    header = (
        'Bearer realm="https://auth.example/token",service="registry.example",'
        'scope="repository:team/app:pull,push"'
    )
    [challenge] = parse_challenges(header)
    assert challenge.scheme == "bearer"
    assert challenge.params == {
        "realm": "https://auth.example/token",
        "service": "registry.example",
        "scope": "repository:team/app:pull,push",
    }


def test_parse_basic_and_multiple_challenges() -> None:
    parsed = parse_challenges('Basic realm="Registry Realm", Bearer realm="https://a/t",error=x')
    assert [c.scheme for c in parsed] == ["basic", "bearer"]
    assert parsed[0].params == {"realm": "Registry Realm"}
    assert parsed[1].params == {"realm": "https://a/t", "error": "x"}


def test_parse_quoted_escapes_and_empty() -> None:
    [challenge] = parse_challenges(r'Bearer realm="a\"b"')
    assert challenge.params["realm"] == 'a"b'
    assert parse_challenges("") == []


# ---------------------------------------------------------------- small client helpers


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("localhost:5000", True),
        ("localhost", True),
        ("127.0.0.1:5000", True),
        ("127.1.2.3", True),
        ("[::1]:5000", True),
        ("registry.example:5000", False),
        ("10.0.0.1:5000", False),
        ("localhost.example.com", False),
        ("docker.io", False),
    ],
)
def test_plain_http_only_for_loopback(host: str, allowed: bool) -> None:
    assert plain_http_allowed(host) is allowed


def test_plain_http_for_listed_insecure_registries() -> None:
    assert plain_http_allowed("reg.lan:5000", {"reg.lan:5000"})
    assert plain_http_allowed("reg.lan:5000", {"reg.lan"})
    assert not plain_http_allowed("reg.lan:5001", {"reg.lan:5000"})


def test_retry_after_seconds_and_http_date() -> None:
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0
    assert parse_retry_after("garbage") is None and parse_retry_after(None) is None


# ---------------------------------------------------------------- where credentials may go


@pytest.mark.parametrize(
    ("url", "owner", "allowed"),
    [
        # The registry's own origin, and the token realm its challenge names (another host).
        ("https://reg.example/v2/app/blobs/x", "https://reg.example/v2/app/manifests/1", True),
        ("https://reg.example:443/v2/", "https://reg.example/v2/", True),
        ("https://auth.example/token", "https://auth.example/token", True),
        ("http://127.0.0.1:5001/token", "http://127.0.0.1:5001/token", True),
        ("http://reg.lan:5000/v2/", "http://reg.lan:5000/v2/", True),  # listed insecure
        # Redirects elsewhere: another host, port, or a downgrade to http.
        ("https://storage.example/blob", "https://reg.example/v2/", False),
        ("https://reg.example:8443/v2/", "https://reg.example/v2/", False),
        ("http://reg.example/v2/", "https://reg.example/v2/", False),
        # A realm over plain http to a host that is neither loopback nor listed.
        ("http://auth.example/token", "http://auth.example/token", False),
        ("ftp://127.0.0.1/token", "ftp://127.0.0.1/token", False),
    ],
)
def test_may_send_credentials_rule(url: str, owner: str, allowed: bool) -> None:
    with RegistryClient(docker_config=DockerConfig(), insecure_registries=["reg.lan:5000"]) as c:
        assert c._auth.may_send_credentials(url, owner) is allowed


class RecordingRealm:
    """A token realm on 127.0.0.1 that hands out a token and records each request as it came."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str | None, bytes]] = []  # (method, Authorization, body)
        realm = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                realm.seen.append((self.command, self.headers.get("Authorization"), body))
                data = json.dumps({"token": "tok-123", "expires_in": 300}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _answer

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/token"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


NETRC_PASSWORD = "netrc-pw-never-sent"


@pytest.fixture
def netrc_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """HOME with a ~/.netrc that has a login for 127.0.0.1, as a user's machine might."""
    home = tmp_path / "home"
    home.mkdir()
    netrc = home / ".netrc"
    netrc.write_text(f"machine 127.0.0.1\nlogin netrc-user\npassword {NETRC_PASSWORD}\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("NETRC", raising=False)
    return home


@pytest.mark.parametrize("creds", [None, Credentials("alice", "pw-a"),
                                   Credentials("<token>", "refresh-1")],
                         ids=["anonymous", "login", "identity-token"])
def test_token_request_ignores_netrc(netrc_home: Path, creds: Credentials | None) -> None:
    import requests

    realm = RecordingRealm()
    try:
        auths = {} if creds is None else {"127.0.0.1:5000": {
            "identitytoken": creds.password} if creds.is_identity_token else {
            "auth": b64(f"{creds.username}:{creds.password}")}}
        auth = Authenticator(requests.Session(), DockerConfig({"auths": auths}),
                             url_allowed=lambda url: True, timeout=10)
        header = auth.authenticate("127.0.0.1:5000", "127.0.0.1:5000", "repository:app:pull",
                                   f'Bearer realm="{realm.url}",service="reg"')
    finally:
        realm.close()
    assert header == "Bearer tok-123"
    [(method, authorization, body)] = realm.seen
    netrc_basic = "Basic " + b64(f"netrc-user:{NETRC_PASSWORD}")
    assert authorization != netrc_basic and NETRC_PASSWORD.encode() not in body
    if creds is None:
        assert (method, authorization) == ("GET", None)
    elif creds.is_identity_token:
        assert method == "POST" and authorization is None and b"refresh-1" in body
    else:
        assert (method, authorization) == ("GET", creds.basic_header())
