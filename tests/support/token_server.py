"""A small bearer-token server for testing the registry token flow against real distribution.

It speaks the Docker/distribution token protocol: `GET /token?service=..&scope=..` with
optional basic auth, or `POST /token` with an OAuth2 form (`grant_type=password` or
`refresh_token`, the "identity token" flow). Tokens are JWTs signed ES256 by a throwaway
key whose self-signed certificate is both the registry's `rootcertbundle` and the token's
`x5c` header, which is how distribution 2.8 finds and trusts the signing key.

Policy: anyone may pull repositories under `public/`; known users may pull and push
everything; bad credentials get 401 (as real token servers answer).
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import json
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import NamedTuple, Self
from urllib.parse import parse_qs, urlsplit

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

SERVICE = "layerwarm-test-registry"
ISSUER = "layerwarm-test-issuer"


class TokenRequest(NamedTuple):
    """One request the server answered: who asked (None = anonymous) for which scopes."""

    method: str
    subject: str | None
    scopes: tuple[str, ...]
    status: int


def self_signed_cert(
    key: ec.EllipticCurvePrivateKey, common_name: str, *, ip: str | None = None
) -> x509.Certificate:
    """A self-signed CA certificate for `key` (also usable as a TLS server cert for `ip`)."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    )
    if ip is not None:
        san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))])
        builder = builder.add_extension(san, critical=False)
    return builder.sign(key, hashes.SHA256())


class TokenServer:
    """Issues registry tokens on a free 127.0.0.1 port; see the module docstring for policy."""

    def __init__(
        self,
        users: Mapping[str, str] | None = None,
        refresh_tokens: Mapping[str, str] | None = None,
        *,
        public_prefix: str = "public/",
        ttl: int = 300,
    ) -> None:
        self.users = dict(users if users is not None else {"alice": "s3cret-pw"})
        # identity token -> user, for the POST grant_type=refresh_token flow
        self.refresh_tokens = dict(refresh_tokens or {})
        self.public_prefix = public_prefix
        self.ttl = ttl
        self.service, self.issuer = SERVICE, ISSUER
        self.workdir = Path(tempfile.mkdtemp(prefix="layerwarm-token-"))
        self._key = ec.generate_private_key(ec.SECP256R1())
        cert = self_signed_cert(self._key, "layerwarm test token signer")
        self.rootcertbundle = self.workdir / "token-signer.pem"
        self.rootcertbundle.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        self._x5c = [base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()]
        self._lock = threading.Lock()
        self._log: list[TokenRequest] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.tokens = self  # type: ignore[attr-defined]
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), daemon=True
        )
        self._thread.start()

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    def registry_config(self) -> dict:
        """The `auth.token` section for a RegistryServer's `extra_config`."""
        return {
            "auth": {
                "token": {
                    "realm": self.realm,
                    "service": self.service,
                    "issuer": self.issuer,
                    "rootcertbundle": str(self.rootcertbundle),
                }
            }
        }

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def requests_log(self) -> list[TokenRequest]:
        with self._lock:
            return list(self._log)

    def reset(self) -> None:
        with self._lock:
            self._log.clear()

    # ------------------------------------------------------------ tokens

    def mint(self, subject: str, access: list[dict], ttl: int | None = None) -> str:
        """A signed token for `access`, e.g. [{"type": "repository", "name": "x",
        "actions": ["pull", "push"]}]; tests use it to push to the token registry."""
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "sub": subject,
            "aud": self.service,
            "exp": now + (ttl or self.ttl),
            "nbf": now - 10,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": access,
        }
        return jwt.encode(claims, self._key, algorithm="ES256", headers={"x5c": self._x5c})

    def grant(self, subject: str | None, scope: str) -> dict | None:
        """The access entry `subject` gets for one `type:name:actions` scope (None: nothing)."""
        kind, _, rest = scope.partition(":")
        name, _, actions = rest.rpartition(":")
        if kind != "repository" or not name:
            return None
        allowed = (
            {"pull", "push"}
            if subject
            else ({"pull"} if name.startswith(self.public_prefix) else set())
        )
        granted = [a for a in actions.split(",") if a in allowed]
        return {"type": kind, "name": name, "actions": granted} if granted else None

    def issue(self, method: str, subject: str | None, scopes: list[str]) -> dict:
        access = [g for s in scopes if (g := self.grant(subject, s)) is not None]
        token = self.mint(subject or "", access)
        self._record(method, subject, scopes, 200)
        issued = dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z")
        return {"token": token, "access_token": token, "expires_in": self.ttl, "issued_at": issued}

    def _record(self, method: str, subject: str | None, scopes: list[str], status: int) -> None:
        with self._lock:
            self._log.append(TokenRequest(method, subject, tuple(scopes), status))


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: ThreadingHTTPServer

    @property
    def tokens(self) -> TokenServer:
        return self.server.tokens  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def _reply(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status == 401:
            self.send_header("WWW-Authenticate", 'Basic realm="layerwarm-test-token"')
        self.end_headers()
        self.wfile.write(data)

    def _check(self, params: dict[str, list[str]]) -> bool:
        service = params.get("service", [self.tokens.service])[0]
        if service != self.tokens.service:
            self._reply(400, {"errors": [{"code": "DENIED", "message": "unknown service"}]})
            return False
        return True

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        params = parse_qs(parts.query)
        if parts.path != "/token":
            self._reply(404, {})
            return
        if not self._check(params):
            return
        scopes = params.get("scope", [])
        subject = None
        header = self.headers.get("Authorization", "")
        if header:
            scheme, _, value = header.partition(" ")
            try:
                user, _, password = base64.b64decode(value).decode().partition(":")
            except ValueError:
                user, password = "", None
            if scheme.lower() != "basic" or self.tokens.users.get(user) != password:
                self.tokens._record("GET", user or "?", scopes, 401)
                self._reply(401, {"details": "invalid credentials"})
                return
            subject = user
        self._reply(200, self.tokens.issue("GET", subject, scopes))

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        form = parse_qs(self.rfile.read(length).decode())
        if urlsplit(self.path).path != "/token":
            self._reply(404, {})
            return
        if not self._check(form):
            return
        scopes = " ".join(form.get("scope", [])).split()
        grant = form.get("grant_type", [""])[0]
        subject: str | None = None
        if grant == "refresh_token":
            subject = self.tokens.refresh_tokens.get(form.get("refresh_token", [""])[0])
        elif grant == "password":
            user = form.get("username", [""])[0]
            if self.tokens.users.get(user) == form.get("password", [None])[0]:
                subject = user
        if subject is None:
            self.tokens._record("POST", "?", scopes, 401)
            self._reply(401, {"details": "invalid grant"})
            return
        self._reply(200, self.tokens.issue("POST", subject, scopes))
