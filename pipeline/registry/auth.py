"""Registry credentials and authentication: Docker config, credential helpers, tokens.

Where credentials come from (`CredentialSources`), as podman and skopeo look: the containers
auth file (`--authfile`, else `$REGISTRY_AUTH_FILE`, else `$XDG_RUNTIME_DIR/containers/auth.json`),
then Docker's config.json. In each file (`DockerConfig.credentials_for`, the same format), in
Docker's order: `credHelpers[registry]`, then `credsStore`, then `auths[registry]`.

How they are used (`Authenticator`): the registry answers 401 with a `WWW-Authenticate`
challenge. `Basic` means send the credentials with every request; `Bearer` means ask the
token server named in `realm` for a short-lived token for one scope
(`repository:<name>:pull`), anonymously when there are no credentials. Tokens are cached
per (host, scope) until shortly before they expire, so many threads share one token.

Where credentials may go is one rule, `Authenticator.may_send_credentials`, and every
request that carries them (the client's registry requests, the token request here) asks it.
Secrets never leave this module except inside an Authorization header value (or the token
request's form): they are kept out of reprs, log lines and exception messages. `~/.netrc`
is never consulted: requests would add its login to any request sent without `auth`.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests
from requests.auth import AuthBase

from pipeline.errors import PermanentError, TransientError, Unauthorized, UsageError

log = logging.getLogger(__name__)

HUB_SERVER = "https://index.docker.io/v1/"  # the key `docker login` uses for Docker Hub
_HUB_NAMES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
IDENTITY_TOKEN_USER = "<token>"  # Docker's marker: the password is an OAuth refresh token
_TOKEN_MIN_TTL = 60.0  # the distribution token spec's default and minimum lifetime
_HELPER_TIMEOUT = 30.0


@dataclass(frozen=True)
class Credentials:
    """A username and password (or identity token); the secret stays out of the repr."""

    username: str
    password: str = field(repr=False)

    @property
    def is_identity_token(self) -> bool:
        return self.username == IDENTITY_TOKEN_USER

    def basic_header(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")

    def describe(self) -> str:
        """Who we authenticated as, safe for messages."""
        return "an identity token" if self.is_identity_token else f"user {self.username!r}"


def _host_of(key: str) -> str:
    """`https://host:5000/v1/` -> `host:5000`: Docker stores auths under URLs or hostnames."""
    key = key.strip()
    if "://" in key:
        key = key.split("://", 1)[1]
    return key.split("/", 1)[0].lower()


def _same_registry(key: str, registry: str) -> bool:
    host, wanted = _host_of(key), registry.lower()
    if wanted in _HUB_NAMES:
        return host in _HUB_NAMES
    return host == wanted


class DockerConfig:
    """The parts of Docker's config.json that say how to log in to registries."""

    def __init__(self, data: Mapping[str, Any] | None = None, path: Path | None = None,
                 what: str = "Docker config") -> None:
        data = data or {}
        self.path = path
        self.what = what  # how messages name the file: "Docker config" or "auth file"
        auths, helpers = data.get("auths"), data.get("credHelpers")
        self.auths: dict[str, Any] = auths if isinstance(auths, dict) else {}
        self.cred_helpers: dict[str, str] = helpers if isinstance(helpers, dict) else {}
        store = data.get("credsStore")
        self.creds_store: str | None = store if isinstance(store, str) and store else None

    @classmethod
    def load(cls, env: Mapping[str, str] | None = None) -> DockerConfig:
        """Read `$DOCKER_CONFIG/config.json` or `~/.docker/config.json`; none -> empty."""
        env = os.environ if env is None else env
        if env.get("DOCKER_CONFIG"):
            path = Path(env["DOCKER_CONFIG"]) / "config.json"
        else:
            home = env.get("HOME")
            path = (Path(home) if home else Path.home()) / ".docker" / "config.json"
        return cls.read(path, "Docker config", missing_ok=True)

    @classmethod
    def read(cls, path: Path, what: str, *, missing_ok: bool) -> DockerConfig:
        """One credentials file; a missing one is empty when `missing_ok`, else UsageError."""
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            if missing_ok:
                return cls(path=path, what=what)
            raise UsageError(f"cannot read {what} {path}: No such file or directory") from None
        except OSError as e:
            raise UsageError(f"cannot read {what} {path}: {e.strerror}") from None
        try:
            data = json.loads(text)
        except ValueError as e:
            # The position only, never the text: the file holds secrets.
            raise UsageError(
                f"{what} {path} is not valid JSON (line {getattr(e, 'lineno', '?')})"
            ) from None
        if not isinstance(data, dict):
            raise UsageError(f"{what} {path} is not a JSON object")
        return cls(data, path, what)

    def credentials_for(self, registry: str) -> Credentials | None:
        """Credentials for `registry` (a host[:port] or docker.io), or None for anonymous."""
        hub = registry.lower() in _HUB_NAMES
        server = HUB_SERVER if hub else registry
        helper = next((h for k, h in self.cred_helpers.items()
                       if isinstance(h, str) and _same_registry(k, registry)), None)
        if helper:
            return _run_helper(helper, server)
        if self.creds_store:
            found = _run_helper(self.creds_store, server)
            if found is not None:
                return found
        # Exact keys first (Docker's own lookup), then any key naming the same host.
        keys = [k for k in dict.fromkeys((server, registry)) if k in self.auths]
        keys += [k for k in self.auths if k not in keys and _same_registry(k, registry)]
        for key in keys:
            creds = self._from_auth_entry(key)
            if creds is not None:
                return creds
        return None

    def _from_auth_entry(self, key: str) -> Credentials | None:
        entry = self.auths.get(key)
        if not isinstance(entry, dict):
            return None
        if isinstance(entry.get("identitytoken"), str) and entry["identitytoken"]:
            return Credentials(IDENTITY_TOKEN_USER, entry["identitytoken"])
        if isinstance(entry.get("auth"), str) and entry["auth"]:
            try:
                user, sep, password = base64.b64decode(entry["auth"]).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                sep = ""
            if not sep:
                raise UsageError(
                    f"{self.what} {self.path}: auths[{key!r}].auth is not base64 'user:password'"
                )
            return Credentials(user, password)
        user, password = entry.get("username"), entry.get("password")
        if isinstance(user, str) and user and isinstance(password, str):
            return Credentials(user, password)
        return None


class CredentialSources:
    """The credentials files in the order podman and skopeo read them: the first that has
    credentials for a registry gives them."""

    def __init__(self, configs: Sequence[DockerConfig]) -> None:
        self.configs = tuple(configs)

    @classmethod
    def load(
        cls, env: Mapping[str, str] | None = None, authfile: Path | None = None
    ) -> CredentialSources:
        """`authfile` (--authfile), else `$REGISTRY_AUTH_FILE`, else
        `$XDG_RUNTIME_DIR/containers/auth.json`; then Docker's config. A file named by the
        user must be readable (UsageError); the default locations may be absent."""
        env = os.environ if env is None else env
        named = authfile or (Path(env["REGISTRY_AUTH_FILE"]) if env.get("REGISTRY_AUTH_FILE")
                             else None)
        if named is not None:
            containers = DockerConfig.read(named, "auth file", missing_ok=False)
        elif env.get("XDG_RUNTIME_DIR"):
            path = Path(env["XDG_RUNTIME_DIR"]) / "containers" / "auth.json"
            containers = DockerConfig.read(path, "auth file", missing_ok=True)
        else:
            containers = DockerConfig()
        return cls([containers, DockerConfig.load(env)])

    def credentials_for(self, registry: str) -> Credentials | None:
        for config in self.configs:
            creds = config.credentials_for(registry)
            if creds is not None:
                return creds
        return None


def _run_helper(helper: str, server: str) -> Credentials | None:
    """`docker-credential-<helper> get` with the server URL on stdin (Docker's protocol)."""
    import subprocess  # here, not at the top: most runs use no credential helper

    if not re.fullmatch(r"[A-Za-z0-9._-]+", helper):
        raise UsageError(f"invalid credential helper name {helper[:60]!r} in Docker config")
    program = f"docker-credential-{helper}"
    try:
        done = subprocess.run(
            [program, "get"], input=server.encode(), capture_output=True,
            timeout=_HELPER_TIMEOUT, check=False,
        )
    except FileNotFoundError:
        raise UsageError(f"credential helper {program} not found on PATH") from None
    except subprocess.TimeoutExpired:
        raise UsageError(f"credential helper {program} timed out for {server}") from None
    if done.returncode != 0:
        said = (done.stdout or done.stderr).decode(errors="replace").strip()
        if "credentials not found" in said.lower():
            return None
        first = said.splitlines()[0][:200] if said else f"exit status {done.returncode}"
        raise UsageError(f"credential helper {program} failed for {server}: {first}")
    try:
        obj = json.loads(done.stdout)
        username, secret = obj["Username"], obj["Secret"]
    except (ValueError, KeyError, TypeError):
        username = secret = None
    if not isinstance(username, str) or not isinstance(secret, str):
        raise UsageError(f"credential helper {program} gave unreadable output for {server}")
    return Credentials(username, secret)


# ------------------------------------------------------------------ challenges

@dataclass(frozen=True)
class Challenge:
    """One `WWW-Authenticate` challenge: scheme (lowercase) and its parameters."""

    scheme: str
    params: Mapping[str, str]


# `\s*(?:,\s*)?`, not `\s*,?\s*`: the latter backtracks quadratically on long runs of
# spaces, and the header comes from whoever answers the request.
_SCHEME = re.compile(r"\s*(?:,\s*)?([A-Za-z][A-Za-z0-9!#$%&'*+.^_`|~-]*)(?=\s|$|,)")
_PARAM = re.compile(r'\s*(?:,\s*)?([A-Za-z0-9_-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^,\s]*)')
MAX_CHALLENGE = 8192
_TOKEN_CHARS = re.compile(r"[\x21-\x7e]{1,16384}")


def parse_challenges(header: str) -> list[Challenge]:
    """Parse a WWW-Authenticate value, e.g. `Bearer realm="..",service="..",scope=".."`.

    Quoted values may hold commas (scopes like `repository:x:pull,push`), so this scans
    tokens instead of splitting on commas. Several challenges may share one header.
    """
    out: list[Challenge] = []
    if len(header) > MAX_CHALLENGE:
        return out  # no real challenge is this long; treat it as none
    pos = 0
    while pos < len(header):
        m = _SCHEME.match(header, pos)
        if m is None:
            break
        scheme, pos, params = m.group(1).lower(), m.end(), {}
        while (p := _PARAM.match(header, pos)) is not None:
            value = p.group(2)
            if value.startswith('"'):
                value = re.sub(r"\\(.)", r"\1", value[1:-1])
            params[p.group(1).lower()] = value
            pos = p.end()
        out.append(Challenge(scheme, params))
    return out


# ------------------------------------------------------------------ authenticator

class NoNetrc(AuthBase):
    """Passed as `auth` so requests never adds ~/.netrc credentials to a request.

    With `auth=None`, requests looks the URL's host up in ~/.netrc and sends that login as
    Basic auth, replacing an Authorization header set by hand.
    """

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        return r


def _origin(url: str) -> tuple[str, str, int]:
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return parts.scheme, (parts.hostname or "").lower(), port


class Authenticator:
    """Turns challenges into Authorization header values and caches them, thread-safely.

    `url_allowed(url)` is the client's transport policy (https, or plain http to loopback
    and to hosts listed as insecure); `may_send_credentials` builds on it.
    """

    def __init__(
        self, session: requests.Session, docker_config: DockerConfig | CredentialSources, *,
        url_allowed: Callable[[str], bool], timeout: float,
    ) -> None:
        self._session = session
        self._config = docker_config
        self._url_allowed = url_allowed
        self._timeout = timeout
        self._lock = threading.Lock()
        self._cache: dict[tuple[str, str], tuple[str, float]] = {}  # -> (header, expiry)
        self._key_locks: dict[tuple[str, str], threading.Lock] = {}
        self._creds: dict[str, Credentials | None] = {}

    def may_send_credentials(self, url: str, owner: str) -> bool:
        """Whether a request to `url` may carry registry credentials. The one rule:

        - `owner` is who the credentials are for: the registry's own origin (its login or
          the token it issued), or the token realm that registry's 401 challenge names
          (the login, as Docker sends it; the realm is often another host, e.g.
          auth.docker.io for registry-1.docker.io). `url` must have the same origin
          (scheme, host, port) as `owner`: a redirect elsewhere, e.g. a blob sent on to
          storage, gets no Authorization.
        - `url` must be https, or plain http to a loopback host or one listed as insecure
          (the same rule as for talking to a registry at all).
        """
        return self._url_allowed(url) and _origin(url) == _origin(owner)

    def credentials(self, registry: str) -> Credentials | None:
        """Credentials for `registry`, looked up once (helpers can be slow processes)."""
        with self._lock:
            if registry in self._creds:
                return self._creds[registry]
        creds = self._config.credentials_for(registry)
        with self._lock:
            self._creds[registry] = creds
        return creds

    def cached(self, host: str, scope: str) -> str | None:
        """The Authorization value to send first, if a live one is cached."""
        now = time.monotonic()
        with self._lock:
            for key in ((host, scope), (host, "")):  # "" = basic auth, valid for any scope
                hit = self._cache.get(key)
                if hit is not None and hit[1] > now:
                    return hit[0]
        return None

    def authenticate(
        self, registry: str, host: str, scope: str, challenge_header: str,
        *, rejected: str | None = None,
    ) -> str:
        """Answer a 401 challenge from `host`; returns the Authorization value to retry with.

        `rejected` is the value the 401 answered; if another thread has meanwhile cached
        a different one, that is reused instead of asking the token server again.
        """
        challenges = {c.scheme: c for c in parse_challenges(challenge_header)}
        creds = self.credentials(registry)
        if "bearer" in challenges and challenges["bearer"].params.get("realm"):
            key = (host, scope)
            with self._lock:
                key_lock = self._key_locks.setdefault(key, threading.Lock())
            with key_lock:
                current = self.cached(host, scope)
                if current is not None and current != rejected:
                    return current
                token, ttl = self._fetch_token(challenges["bearer"].params, scope, creds, host)
                header = f"Bearer {token}"
                self._store(key, header, ttl)
                return header
        if "basic" in challenges:
            if creds is None:
                raise Unauthorized(
                    f"{host} asks for a login and there are no credentials for {registry} "
                    "in the Docker config"
                )
            if creds.is_identity_token:
                raise Unauthorized(f"{host} asks for basic auth; an identity token cannot do it")
            header = creds.basic_header()
            self._store((host, ""), header, 24 * 3600.0)
            return header
        schemes = ", ".join(challenges) or "none"
        raise Unauthorized(f"{host} answered 401 with no usable challenge (schemes: {schemes})")

    def _store(self, key: tuple[str, str], header: str, ttl: float) -> None:
        with self._lock:
            self._cache[key] = (header, time.monotonic() + ttl)

    def _ask_token_server(self, realm: str, query: dict[str, str],
                          creds: Credentials | None) -> requests.Response:
        """One token request: an identity token is exchanged by POST (OAuth2 refresh),
        a login or nobody asks by GET with basic auth. Never redirected, never ~/.netrc."""
        if creds is not None and creds.is_identity_token:
            form = {**query, "grant_type": "refresh_token", "client_id": "layerwarm",
                    "refresh_token": creds.password}
            return self._session.post(realm, data=form, timeout=self._timeout,
                                      allow_redirects=False, auth=NoNetrc())
        headers = {"Authorization": creds.basic_header()} if creds else {}
        return self._session.get(realm, params=query, headers=headers, timeout=self._timeout,
                                 allow_redirects=False, auth=NoNetrc())

    def _fetch_token(
        self, params: Mapping[str, str], scope: str, creds: Credentials | None, host: str,
    ) -> tuple[str, float]:
        realm = params["realm"]
        realm_host = urlsplit(realm).netloc or realm[:100]
        # The realm this registry's challenge named is itself an owner of the login; the
        # rule is asked even for an anonymous request, whose scope names the repository.
        if not self.may_send_credentials(realm, realm):
            raise Unauthorized(
                f"{host} names token server {realm[:100]!r}, which is not https and not an "
                "allowed insecure host; refusing to send a token request there"
            )
        query = {"scope": scope}
        if params.get("service"):
            query["service"] = params["service"]
        who = creds.describe() if creds else "anonymous"
        try:
            resp = self._ask_token_server(realm, query, creds)
        except requests.RequestException as e:
            raise TransientError(
                f"token server {realm_host} for {host} unreachable: {type(e).__name__}"
            ) from None
        with resp:
            if resp.status_code in (401, 403):
                raise Unauthorized(
                    f"token server {realm_host} refused {who} for {scope} on {host} "
                    f"(HTTP {resp.status_code})"
                )
            if resp.status_code == 429 or resp.status_code >= 500:
                raise TransientError(
                    f"token server {realm_host} for {host}: HTTP {resp.status_code}"
                )
            try:
                body = resp.json() if resp.status_code == 200 else {}
            except ValueError:
                body = {}
        token = body.get("token") or body.get("access_token")
        if not isinstance(token, str) or not token:
            raise Unauthorized(
                f"token server {realm_host} gave no token for {scope} on {host} "
                f"(HTTP {resp.status_code})"
            )
        if not _TOKEN_CHARS.fullmatch(token):
            raise PermanentError(
                f"token server {realm_host} for {host} sent a token that cannot be used in "
                "an HTTP header (control characters or spaces)"
            )
        expires_in = body.get("expires_in")
        ttl = float(expires_in) if isinstance(expires_in, int | float) else _TOKEN_MIN_TTL
        log.debug("got token for %s %s as %s, valid %.0fs", host, scope, who, ttl)
        # Renew a little early so a request does not go out with a token about to lapse.
        return token, max(ttl * 0.9 - 5.0, 1.0)
