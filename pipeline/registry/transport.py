"""One GET on the pools of a requests adapter, without requests' per-request machinery.

`requests.Session.get` costs about 0.5 ms of CPU a request before and after the bytes
move: it reads the proxy variables of the environment again, merges cookie jars and
settings, prepares and re-parses the URL, and wraps the answer. A fleet plan makes
12,000 such requests (bench S2), each a small document, so that was a third of its CPU.

`Transport.get` asks the session once per origin (scheme, host, port) what requests
would decide for it (the environment's proxies and no_proxy, the CA bundle of
REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE, the adapter's TLS context) and then sends each GET
on that origin's urllib3 pool directly, as the adapter itself does: the same pools (so
the same deadline-watched connections, pipeline/registry/deadline.py), the same
session headers (read once, when the client makes the transport), the same
`Retry(0, read=False)`, and failures raised as the same requests exception classes, so
the client's error messages read as before. Not carried over: the session's cookie jar
(a registry GET neither sends nor keeps cookies, as containerd's and Docker's do not) and
~/.netrc (the client never wanted it: NoNetrc).
The answers' headers are parsed by pipeline/registry/headerparse.py.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.exceptions import (
    ClosedPoolError,
    ConnectTimeoutError,
    MaxRetryError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
    ResponseError,
)
from urllib3.exceptions import InvalidHeader as _InvalidHeader
from urllib3.exceptions import ProxyError as _ProxyError
from urllib3.exceptions import SSLError as _SSLError

from pipeline.registry import headerparse

headerparse.install()  # response headers without the email package (12,000 of them: S2)


class Answer:
    """A urllib3 response under the names the client reads from a `requests.Response`."""

    __slots__ = ("headers", "raw", "reason", "status_code", "url")

    def __init__(self, raw: urllib3.BaseHTTPResponse, url: str) -> None:
        self.raw = raw
        self.url = url
        self.status_code = raw.status
        self.headers = raw.headers
        self.reason = raw.reason

    def close(self) -> None:
        """As `requests.Response.close` does for a body read from `raw`: a connection whose
        body was read to the end is already back in its pool; any other is dropped."""
        self.raw.close()
        self.raw.release_conn()

    def __enter__(self) -> Answer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class _Route:
    pool: Any  # urllib3.HTTPConnectionPool, or a proxy's
    full_url: bool  # through a plain-HTTP proxy the request line carries the whole URL


class Transport:
    """GETs on `adapter`'s pools, as `session` would send them; see the module docstring."""

    def __init__(self, session: requests.Session, adapter: HTTPAdapter) -> None:
        self._session = session
        self._adapter = adapter
        # Set by the client before it makes its transport; a plain dict merges faster than
        # the session's case-insensitive one, once a request.
        self._headers = dict(session.headers)
        self._routes: dict[tuple[str, str, int | None], _Route] = {}
        self._lock = threading.Lock()

    def get(self, url: str, headers: dict[str, str],
            timeout: tuple[float, float]) -> Answer:
        """One GET of `url` (no redirect followed, body not read), as `session.get(url,
        headers=headers, stream=True, allow_redirects=False, timeout=timeout)` would send it."""
        try:
            parsed = urllib3.util.parse_url(url)
        except urllib3.exceptions.LocationValueError as e:  # what requests' prepare says
            raise requests.exceptions.InvalidURL(e) from None
        route = self._route(url, (parsed.scheme or "", parsed.host or "", parsed.port))
        sent = {**self._headers, **headers}
        try:
            raw = route.pool.urlopen(
                "GET", url if route.full_url else parsed.request_uri, body=None, headers=sent,
                redirect=False, assert_same_host=False, preload_content=False,
                decode_content=False, retries=self._adapter.max_retries,
                timeout=urllib3.Timeout(connect=timeout[0], read=timeout[1]), chunked=False)
        except BaseException as e:
            _reraise_as_requests(e)
            raise
        return Answer(raw, url)

    def _route(self, url: str, origin: tuple[str, str, int | None]) -> _Route:
        route = self._routes.get(origin)
        # A pool the adapter's pool manager has evicted (it keeps a few) is closed: ask again.
        if route is None or getattr(route.pool, "pool", None) is None:
            with self._lock:
                route = self._routes[origin] = self._resolve(url)
        return route

    def _resolve(self, url: str) -> _Route:
        """What requests decides for every request to `url`'s origin."""
        request = requests.Request("GET", url).prepare()
        env = self._session.merge_environment_settings(url, {}, True, None, None)
        verify, proxies, cert = env["verify"], env["proxies"], env["cert"]
        try:
            pool = self._adapter.get_connection_with_tls_context(
                request, verify, proxies=proxies, cert=cert)
        except urllib3.exceptions.LocationValueError as e:
            raise requests.exceptions.InvalidURL(e, request=request) from None
        self._adapter.cert_verify(pool, url, verify, cert)
        return _Route(pool, self._adapter.request_url(request, proxies) != request.path_url)


# urllib3's failure -> requests' name for it (the first two also as a MaxRetryError's reason)
_KINDS: tuple[tuple[type[BaseException], type[requests.RequestException]], ...] = (
    (_ProxyError, requests.exceptions.ProxyError), (_SSLError, requests.exceptions.SSLError),
    (ReadTimeoutError, requests.ReadTimeout), (_InvalidHeader, requests.exceptions.InvalidHeader),
)


def _reraise_as_requests(e: BaseException) -> None:
    """Raise the requests exception `HTTPAdapter.send` makes of a urllib3 failure (the same
    classes, so the same names in messages); return for anything it lets through."""
    if isinstance(e, (ProtocolError, OSError, ClosedPoolError)):
        raise requests.ConnectionError(e) from e
    retried = isinstance(e, MaxRetryError)
    cause = e.reason if isinstance(e, MaxRetryError) else e
    if retried and isinstance(cause, ConnectTimeoutError) and not isinstance(
            cause, NewConnectionError):
        raise requests.ConnectTimeout(e) from e
    if retried and isinstance(cause, ResponseError):
        raise requests.exceptions.RetryError(e) from e
    for theirs, ours in _KINDS[:2] if retried else _KINDS:
        if isinstance(cause, theirs):
            raise ours(e) from e
    if retried:
        raise requests.ConnectionError(e) from e
