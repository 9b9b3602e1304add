"""Registry authentication: the HTTP challenge and the token handshake.

Credentials come from credentials.py (`CredentialSources`). How they are used
(`Authenticator`): the registry answers 401 with a `WWW-Authenticate`
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

import logging
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

import requests
from requests.auth import AuthBase

from pipeline.errors import PermanentError, TransientError, Unauthorized
from pipeline.registry.credentials import Credentials, CredentialSources, DockerConfig

log = logging.getLogger(__name__)

_TOKEN_MIN_TTL = 60.0  # the distribution token spec's default and minimum lifetime


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
