"""Read-only OCI distribution client: manifests, small blobs, and resumable blob streams.

One `requests.Session` per client, shared by many threads; its GETs go straight to its
adapter's urllib3 pools (pipeline/registry/transport.py). Every request goes through
`_send`: authentication (401 challenge -> token -> one retry), manual redirects (at most
5 hops, http/https only, each under the plain-HTTP rule of the first request,
Authorization only where `may_send_credentials` allows), and status mapping to the
`pipeline.errors` tree. Every request has a deadline (pipeline/registry/deadline.py): a
document all of it, a blob its headers and then a rule of progress. Manifests and configs
are retried here by the one retry policy (pipeline/retry.py); a blob stream is opened
once, since its caller (stages.fetch) retries the whole blob, resuming where it stopped.
"""

from __future__ import annotations

import email.utils
import ipaddress
import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import urljoin, urlsplit

import requests
import urllib3

from pipeline.digest import Digest, Verifier
from pipeline.errors import (
    DigestMismatch,
    InsecureRegistry,
    InvalidDigest,
    InvalidManifest,
    LayerwarmError,
    NotFound,
    PermanentError,
    TransientError,
    Unauthorized,
)
from pipeline.manifest import MANIFEST_TYPES
from pipeline.ratelimit import RateLimiter, Unlimited
from pipeline.reference import Reference
from pipeline.registry.auth import Authenticator
from pipeline.registry.credentials import CredentialSources, DockerConfig
from pipeline.registry.deadline import Deadline, WatchedAdapter, current
from pipeline.registry.transport import Answer, Transport
from pipeline.retry import DEFAULT_POLICY, RetryPolicy

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_REDIRECTS = 5
STALL_BYTES = 64 << 10  # a blob body must bring this much per LAYERWARM_STALL_SECONDS
PENALTY_WITHOUT_RETRY_AFTER = 1.0  # seconds every worker pauses a host after a bare 429
_REDIRECTS = (301, 302, 303, 307, 308)
_STREAM_ERRORS = (requests.RequestException, urllib3.exceptions.HTTPError, OSError)


def plain_http_allowed(hostport: str, insecure: Iterable[str] = ()) -> bool:
    """Loopback (localhost, 127/8, ::1) or explicitly listed hosts may use plain HTTP."""
    hostport = hostport.lower()
    host = urlsplit("//" + hostport).hostname or ""  # strips the port and [] of IPv6
    if host == "localhost" or hostport in insecure or host in insecure:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _origin(url: str) -> tuple[str, str, int]:
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return parts.scheme, (parts.hostname or "").lower(), port


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Retry-After as seconds to wait: delta-seconds or an HTTP-date; None if unusable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _discard(resp: Answer) -> None:
    """Close a response we do not need; a short body is read first so the connection
    goes back to the pool instead of being dropped."""
    try:
        length = resp.headers.get("Content-Length", "")
        if length.isdigit() and int(length) <= 64 * 1024:
            resp.raw.read(int(length) + 1, decode_content=False)
    except _STREAM_ERRORS:
        pass
    resp.close()


def _error_detail(resp: Answer) -> str:
    """`CODE: message` from the registry's JSON error body, else the HTTP reason."""
    try:
        body = json.loads(resp.raw.read(64 * 1024, decode_content=True) or b"{}")
        first = body["errors"][0]
        text = f"{first.get('code', '')}: {first.get('message', '')}".strip(": ")
    except (ValueError, KeyError, IndexError, TypeError, AttributeError, *_STREAM_ERRORS):
        text = ""
    text = _printable(" ".join((text or resp.reason or "").split())[:300])
    return f"HTTP {resp.status_code}" + (f" {text}" if text else "")


def _printable(text: str) -> str:
    """Server-sent text goes into one-line messages on a terminal: no escape sequences."""
    return "".join(c if c.isprintable() else "?" for c in text)


@dataclass(frozen=True)
class FetchedManifest:
    data: bytes
    media_type: str  # from Content-Type
    digest: Digest   # sha256 computed over data


class BlobStream:
    """One streaming blob response. `offset` is where the body starts in the blob.

    From its headers on, the body must keep moving: a window of `stall` seconds without
    STALL_BYTES cuts it (its request's `Deadline`, restarted by progress).
    """

    def __init__(self, resp: Answer, offset: int, length: int | None, what: str,
                 deadline: Deadline, stall: float) -> None:
        self._resp = resp
        self.offset = offset
        self.length = length  # total blob size, when the server said
        self._what = what
        self._deadline, self._stall = deadline, stall
        deadline.restart(stall, f"stalled: less than {STALL_BYTES >> 10} KiB in {stall:g} s "
                                "(LAYERWARM_STALL_SECONDS)")

    def iter_chunks(self, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        """Raw body bytes (never content-decoded: the digest is over the bytes as stored),
        as they arrive, up to `chunk_size` a read, in pieces of STALL_BYTES or more (but the
        last).

        A cut connection or a stall raises TransientError; resume with `open_blob(offset=...)`.
        What arrived before a cut is yielded first; after a stall it is dropped, so a trickle
        never counts as progress (stages.fetch would resume it for ever).
        """
        buf, moved, error = bytearray(), 0, None
        try:
            # read1, not read: a read of chunk_size would wait for all of it, and hide
            # whether bytes are moving at all.
            while piece := self._resp.raw.read1(chunk_size, decode_content=False):
                moved += len(piece)
                if moved >= STALL_BYTES:  # this window brought enough: the next one starts
                    self._deadline.restart(self._stall)
                    moved = 0
                if not buf and len(piece) >= STALL_BYTES:
                    yield piece
                    continue
                buf += piece
                if len(buf) >= STALL_BYTES:
                    yield bytes(buf)
                    buf.clear()
        except _STREAM_ERRORS as e:
            error = e
        stalled = self._deadline.expired  # also ends a body without length, early
        if buf and not stalled:
            yield bytes(buf)
        if error is not None or stalled:
            raise _cut(self._deadline, self._what, error) from error

    def close(self) -> None:
        self._resp.close()
        self._deadline.close()

    def __enter__(self) -> BlobStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextmanager
def _under(deadline: Deadline, where: str) -> Iterator[None]:
    """Requests sent in the block are bound by `deadline`; an error its cut caused says so
    (a TransientError: retried like a timeout)."""
    try:
        with deadline.current():
            yield
    except (LayerwarmError, *_STREAM_ERRORS):
        if deadline.expired:
            raise _cut(deadline, where, None) from None
        raise


def _cut(deadline: Deadline, where: str, error: BaseException | None) -> TransientError:
    """The error for a body that ended early: the deadline's, if that is what cut it."""
    if deadline.expired or error is None:
        return TransientError(f"{where}: {deadline.why}")
    return TransientError(f"{where}: connection lost mid-body ({type(error).__name__})")


class RegistryClient:
    def __init__(
        self, *, insecure_registries: Iterable[str] = (),
        docker_config: DockerConfig | CredentialSources | None = None,
        timeout: float = 60.0, retry: RetryPolicy = DEFAULT_POLICY,
        sleep: Callable[[float], None] = time.sleep, rate_limiter: RateLimiter | None = None,
    ) -> None:
        self._insecure = frozenset(h.lower() for h in insecure_registries)
        self._bases: dict[str, str] = {}  # api host -> scheme://host, by plain_http_allowed
        self._limiter: RateLimiter = rate_limiter or Unlimited()
        self._timeout = timeout
        self.retry = retry
        self._sleep = sleep
        self._session = requests.Session()
        adapter = WatchedAdapter(pool_connections=8, pool_maxsize=32, max_retries=0)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)
        # Blobs must arrive byte-exact; compressed transfer would only cost CPU here.
        self._session.headers.update({"User-Agent": "layerwarm", "Accept-Encoding": "identity"})
        self._transport = Transport(self._session, adapter)  # the registry's GETs
        self._auth = Authenticator(
            self._session,
            docker_config if docker_config is not None else CredentialSources.load(),
            url_allowed=self._url_allowed, timeout=timeout,
        )

    def close(self) -> None:
        self._session.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -------------------------------------------------------------- public API

    def fetch_manifest(
        self, ref: Reference, accept: Sequence[str] = MANIFEST_TYPES, *, max_bytes: int = 4 << 20,
    ) -> FetchedManifest:
        """GET a manifest or index; verified against `ref.digest` when the ref is pinned."""
        what = f"manifest {ref.manifest_id}"
        headers = {"Accept": ", ".join(accept)}

        def attempt() -> FetchedManifest:
            with (self._document(f"{what} from {ref.name}"),
                  self._send(ref, f"manifests/{ref.manifest_id}", what, headers) as resp):
                data = self._read_capped(resp, max_bytes, what, ref, decode=True)
                media_type = resp.headers.get("Content-Type", "").split(";")[0].strip()
                claimed = resp.headers.get("Docker-Content-Digest")
            sha = Digest.of_bytes(data)
            expected = ref.digest
            if expected is None and claimed and claimed.startswith("sha256:"):
                try:  # a tag fetch: check what the registry says, if it says it well
                    expected = Digest.parse(claimed)
                except InvalidDigest:
                    raise InvalidManifest(
                        f"{what} from {ref.name}: the registry's Docker-Content-Digest header "
                        f"is not a digest ({_printable(claimed[:80])!r})") from None
            if expected is not None:
                actual = sha if expected.algorithm == "sha256" else Digest.of_bytes(
                    data, expected.algorithm)
                if actual != expected:
                    raise DigestMismatch(
                        f"{what} from {ref.name}: expected {expected}, got {actual}")
            return FetchedManifest(data, media_type, sha)

        return self.retry.run(attempt, what, self._sleep)

    def fetch_blob(self, ref: Reference, digest: Digest, *, max_bytes: int = 8 << 20) -> bytes:
        """GET a small blob (an image config) whole, verified against `digest`."""
        what = f"blob {digest}"

        def attempt() -> bytes:
            with (self._document(f"{what} from {ref.name}"),
                  self._send(ref, f"blobs/{digest}", what, {}) as resp):
                data = self._read_capped(resp, max_bytes, what, ref, decode=False)
            verifier = Verifier(digest, what=f"{what} from {ref.name}")
            verifier.update(data)
            verifier.verify()
            return data

        return self.retry.run(attempt, what, self._sleep)

    def open_blob(self, ref: Reference, digest: Digest, *, offset: int = 0) -> BlobStream:
        """Open a streaming GET of a blob, from `offset` if the server honours Range.

        One attempt: the caller retries (stages.fetch resumes from the bytes it has). The
        headers must come within the request deadline; the stream keeps that deadline and
        turns it into its stall rule (BlobStream).
        """
        what = f"blob {digest}"
        where = f"{what} from {ref.name}"
        headers = {"Range": f"bytes={offset}-"} if offset > 0 else {}
        deadline = self._request_deadline()
        try:
            with _under(deadline, where):
                resp = self._send(ref, f"blobs/{digest}", what, headers)
                try:
                    return self._blob_stream(resp, offset, where, deadline)
                except BaseException:
                    resp.close()
                    raise
        except BaseException:
            deadline.close()
            raise

    # -------------------------------------------------------------- internals

    def _request_deadline(self) -> Deadline:
        seconds = self.retry.request_deadline
        return Deadline(seconds, f"no complete answer within the {seconds:g} s request "
                                 "deadline (LAYERWARM_REQUEST_DEADLINE)")

    @contextmanager
    def _document(self, where: str) -> Iterator[None]:
        """One attempt at a whole document (its redirects, token and body included) under
        its own request deadline."""
        deadline = self._request_deadline()
        try:
            with _under(deadline, where):
                yield
            if deadline.expired:  # a body without length, ended by the cut
                raise _cut(deadline, where, None)
        finally:
            deadline.close()

    def _url_allowed(self, url: str) -> bool:
        parts = urlsplit(url)
        return parts.scheme == "https" or (
            parts.scheme == "http" and plain_http_allowed(parts.netloc, self._insecure))

    def _base_url(self, ref: Reference) -> str:
        host = ref.api_host
        base = self._bases.get(host)
        if base is None:  # once a host: the rule parses an IP address
            scheme = "http" if plain_http_allowed(host, self._insecure) else "https"
            base = self._bases[host] = f"{scheme}://{host}"
        return base

    def _blob_stream(
        self, resp: Answer, offset: int, what: str, deadline: Deadline,
    ) -> BlobStream:
        size = resp.headers.get("Content-Length")
        stall = self.retry.stall
        if resp.status_code != 206:  # Range ignored (or not asked): the body is the whole blob
            return BlobStream(resp, 0, int(size) if size and size.isdigit() else None, what,
                              deadline, stall)
        # Content-Range: bytes <start>-<end>/<total or *>
        unit, _, spec = resp.headers.get("Content-Range", "").partition(" ")
        span, _, total = spec.partition("/")
        start = span.partition("-")[0]
        if unit != "bytes" or not start.isdigit() or int(start) != offset:
            raise PermanentError(f"{what}: asked for bytes from {offset}, server sent "
                                 f"Content-Range {resp.headers.get('Content-Range')!r}")
        return BlobStream(resp, offset, int(total) if total.isdigit() else None, what,
                          deadline, stall)

    def _read_capped(
        self, resp: Answer, max_bytes: int, what: str, ref: Reference, *, decode: bool,
    ) -> bytes:
        """Read a whole body, stopping as soon as it exceeds `max_bytes`."""
        length = resp.headers.get("Content-Length", "")
        too_big = InvalidManifest(f"{what} from {ref.name} is larger than {max_bytes} bytes")
        if length.isdigit() and int(length) > max_bytes:
            raise too_big
        buf = bytearray()
        try:
            for chunk in resp.raw.stream(64 * 1024, decode_content=decode):
                buf += chunk
                if len(buf) > max_bytes:
                    raise too_big
        except _STREAM_ERRORS as e:
            raise TransientError(f"{what} from {ref.name}: connection lost mid-body "
                                 f"({type(e).__name__})") from None
        return bytes(buf)

    def _send(
        self, ref: Reference, path: str, what: str, headers: dict[str, str],
    ) -> Answer:
        """One authenticated GET, redirects followed; returns an open 2xx response."""
        url = f"{self._base_url(ref)}/v2/{ref.repository}/{path}"
        host, scope = ref.api_host, f"repository:{ref.repository}:pull"
        where = f"{what} from {ref.name}"
        authorization = self._auth.cached(host, scope)
        resp = self._follow(url, headers, authorization, where)
        if resp.status_code == 401 and _origin(resp.url) == _origin(url):
            challenge = resp.headers.get("WWW-Authenticate", "")
            _discard(resp)
            authorization = self._auth.authenticate(
                ref.registry, host, scope, challenge, rejected=authorization)
            resp = self._follow(url, headers, authorization, where)
        status = resp.status_code
        if 200 <= status < 300:
            return resp
        try:
            detail = _error_detail(resp)
            if status == 404:
                raise NotFound(f"{what} not found in {ref.name} ({detail})")
            if status in (401, 403):
                creds = self._auth.credentials(ref.registry) if authorization else None
                as_who = f"as {creds.describe()}" if creds else (
                    f"anonymously (no credentials for {ref.registry} in the Docker config)")
                raise Unauthorized(f"{where} refused: {detail}; tried {as_who}")
            if status in (408, 429) or status >= 500:
                retry_after = parse_retry_after(resp.headers.get("Retry-After"))
                if status == 429:  # the whole fleet slows down for this host, not just us
                    # ... for no longer than the policy would wait itself.
                    pause = self.retry.retry_after(retry_after)
                    self._limiter.penalize(host.lower(), pause or PENALTY_WITHOUT_RETRY_AFTER)
                raise TransientError(f"{where}: {detail}", retry_after=retry_after)
            raise PermanentError(f"{where}: {detail}")
        finally:
            _discard(resp)

    def _follow(
        self, url: str, headers: dict[str, str], authorization: str | None, where: str,
    ) -> Answer:
        """GET `url`, following redirects by hand so the Authorization never leaks."""
        home = url
        for _hop in range(MAX_REDIRECTS + 1):
            sent = dict(headers)
            if authorization and self._auth.may_send_credentials(url, home):
                sent["Authorization"] = authorization
            self._limiter.acquire(urlsplit(url).netloc.lower())
            connect = self._timeout
            if (clock := current()) is not None:
                clock.start()  # now, after the wait for the rate budget
                connect = min(connect, clock.seconds)  # a connect cannot be cut: cap it
            try:
                resp = self._transport.get(url, sent, (connect, self._timeout))
            except requests.RequestException as e:
                netloc = urlsplit(url).netloc
                if "certificate verify failed" in str(e).lower():
                    # An untrusted certificate does not become trusted by retrying.
                    raise PermanentError(f"{where}: TLS certificate of {netloc} failed "
                                         "verification") from None
                raise TransientError(f"{where}: {type(e).__name__} talking to {netloc}") from None
            location = resp.headers.get("Location")
            if resp.status_code not in _REDIRECTS or not location:
                return resp
            _discard(resp)
            url = urljoin(url, location)
            if urlsplit(url).scheme not in ("http", "https"):
                raise PermanentError(
                    f"{where}: refusing redirect to a non-HTTP URL ({urlsplit(url).scheme}:)")
            if not self._url_allowed(url):  # every hop under the first request's rule
                hostport = _printable(urlsplit(url).netloc.rpartition("@")[2][:200])
                raise InsecureRegistry(
                    f"{where}: refusing redirect to plain HTTP at {hostport} (not https, not "
                    "loopback, not in LAYERWARM_INSECURE_REGISTRIES)")
            log.debug("%s: redirected to %s", where, urlsplit(url).netloc)
        raise PermanentError(f"{where}: more than {MAX_REDIRECTS} redirects")
