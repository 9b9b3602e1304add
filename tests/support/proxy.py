"""A counting, fault-injecting HTTP/1.1 reverse proxy for tests.

Put it between the code under test and a real server (usually the registry) to count
requests ("was the blob fetched once?") and to inject faults at runtime: corrupt a byte,
answer with a canned response, fail N times with a status, fail a seeded-random share of
requests, fail everything for a while (an outage), or cut a body mid-stream.

A ``Hold`` stops a stage where a test wants it, whatever the machine's load: the proxy sends
a matching body all but its last bytes and waits for the test to release them, so a fetch
(and the decompression that follows it) is provably mid-way for as long as the test looks.
"""

from __future__ import annotations

import http.client
import random
import re
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import NamedTuple, Self
from urllib.parse import urlsplit

# Not forwarded as-is: connection-level headers, and framing/Host, which the proxy sets.
_HOP_BY_HOP = frozenset(
    "connection keep-alive proxy-authenticate proxy-authorization te trailer"
    " transfer-encoding upgrade content-length host".split()
)
_CHUNK = 64 * 1024


class Hit(NamedTuple):
    """One proxied request: ``path`` includes the query string; ``bytes_sent`` is body bytes;
    ``at`` is when it arrived (time.monotonic(), comparable across the test process)."""

    method: str
    path: str
    status: int
    bytes_sent: int
    at: float = 0.0


@dataclass
class _Rule:
    kind: str  # override | fail | flip | reset
    pattern: re.Pattern[str]
    method: str | None
    times: int | None  # None = forever
    status: int = 0
    body: bytes = b""
    headers: dict[str, str] | None = None
    offset: int = 0  # flip: body offset; reset: bytes sent before the cut
    until: float | None = None  # fail_for: time.monotonic() after which the rule is dead
    ratio: float | None = None  # fail_ratio: share of matching requests that fail
    seed: int | str = 0
    statuses: tuple[int, ...] = ()
    max_streak: int | None = None
    seen: dict[tuple[str, str], int] = field(default_factory=dict)
    streak: dict[tuple[str, str], int] = field(default_factory=dict)

    def roll(self, method: str, path: str) -> int | None:
        """fail_ratio: the status to fail this request with, or None to let it through.

        The n-th request for one method and path always gets the same answer for a seed,
        whatever order concurrent clients send requests in.
        """
        key = (method, path)
        n = self.seen.get(key, 0)
        self.seen[key] = n + 1
        rng = random.Random(f"{self.seed}|{method}|{path}|{n}")
        streak = self.streak.get(key, 0)
        if rng.random() < (self.ratio or 0.0) and (
            self.max_streak is None or streak < self.max_streak
        ):
            self.streak[key] = streak + 1
            return self.statuses[rng.randrange(len(self.statuses))]
        self.streak[key] = 0
        return None


class HoldTimeout(AssertionError):
    """No body reached a hold in time (the stage the test waits for never got there)."""


class Hold:
    """A gate on the bodies of matching requests: each is passed on to ``tail`` bytes short
    of its end, and the rest waits until ``release()``.

    Every matching body is held (a retried request too) until the release; a body of
    unknown length (chunked) or no longer than ``tail`` is held before its first byte.
    ``wait()`` returns once a body has reached the hold: from then on, and until the
    release, the receiver has all of it but the held bytes and can get no further.
    """

    def __init__(self, tail: int) -> None:
        self.tail = tail
        self._cond = threading.Condition()
        self._released = False
        self._held: list[str] = []  # each body that reached the hold, by path

    def stop_at(self, total: int | None) -> int | None:
        """Where a body of ``total`` bytes stops (None: it does not; it was released)."""
        with self._cond:
            if self._released:
                return None
            return max(0, total - self.tail) if total is not None else 0

    def block(self, path: str) -> None:
        """Called by the proxy at the hold: note the body and wait for the release."""
        with self._cond:
            self._held.append(path)
            self._cond.notify_all()
            self._cond.wait_for(lambda: self._released)

    def wait(self, timeout: float = 60, count: int = 1) -> list[str]:
        """Wait until ``count`` bodies have reached the hold; return their paths."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self._held) >= count, timeout=timeout):
                raise HoldTimeout(
                    f"{len(self._held)} of {count} bodies reached the hold (the last "
                    f"{self.tail} bytes) within {timeout:.0f}s: {self._held}"
                )
            return list(self._held)

    @property
    def held(self) -> list[str]:
        with self._cond:
            return list(self._held)

    @property
    def released(self) -> bool:
        with self._cond:
            return self._released

    def release(self) -> None:
        """Let every held body go on to its end, and no later one stop."""
        with self._cond:
            self._released = True
            self._cond.notify_all()


class Proxy:
    """Reverse proxy on a free 127.0.0.1 port forwarding to ``upstream`` (e.g. a registry URL).

    Rules match ``re.search(path_regex, path_with_query)`` and an optional method;
    the first live rule of a kind wins. ``times=None`` means every matching request.
    """

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self.upstream = f"{parts.scheme}://{parts.netloc}"
        self._upstream_host = parts.hostname or "127.0.0.1"
        self._upstream_port = parts.port or 80
        self._lock = threading.Condition()
        self._log: list[Hit] = []
        self._rules: list[_Rule] = []
        self._holds: list[tuple[re.Pattern[str], str | None, Hold]] = []
        self._inflight = 0
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.proxy = self  # type: ignore[attr-defined]
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def stop(self) -> None:
        self.release_holds()  # a handler thread waiting on a hold would never end
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def requests_log(self) -> list[Hit]:
        """A copy of the log, after requests in flight have finished (up to 5 s)."""
        with self._lock:
            self._lock.wait_for(lambda: self._inflight == 0, timeout=5)
            return list(self._log)

    def count(self, method: str | None = "GET", path_regex: str = r"/v2/.+/blobs/sha256:") -> int:
        """How many logged requests match ``method`` (None = any) and ``path_regex``."""
        return _matching(self.requests_log, method, path_regex)

    def finished(self, method: str | None = "GET", path_regex: str = r".") -> int:
        """``count`` of the requests finished so far, without waiting for those in flight
        (a held one would keep ``count`` waiting)."""
        with self._lock:
            hits = list(self._log)
        return _matching(hits, method, path_regex)

    def reset(self) -> None:
        """Forget logged requests (rules stay; see ``clear_rules``)."""
        with self._lock:
            self._log.clear()

    def clear_rules(self) -> None:
        """Drop the fault rules and release every hold."""
        with self._lock:
            self._rules.clear()
        self.release_holds()

    def hold(self, path_regex: str, tail: int, *, method: str | None = "GET") -> Hold:
        """Hold the last ``tail`` bytes of every matching response body until the returned
        ``Hold`` is released (see ``Hold``)."""
        hold = Hold(tail)
        with self._lock:
            self._holds.append((re.compile(path_regex), method, hold))
        return hold

    def release_holds(self) -> None:
        with self._lock:
            holds, self._holds = [h for _p, _m, h in self._holds], []
        for hold in holds:
            hold.release()

    def _hold_for(self, method: str, path: str) -> Hold | None:
        with self._lock:
            for pattern, wanted, hold in self._holds:
                if wanted in (None, method) and pattern.search(path) and not hold.released:
                    return hold
        return None

    def _add(self, rule: _Rule) -> None:
        with self._lock:
            self._rules.append(rule)

    def override(
        self,
        path_regex: str,
        status: int = 200,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        *,
        method: str | None = None,
        times: int | None = None,
    ) -> None:
        """Answer matching requests with this canned response instead of forwarding."""
        self._add(_Rule("override", re.compile(path_regex), method, times, status, body, headers))

    def fail(
        self,
        path_regex: str,
        status: int = 503,
        times: int | None = 1,
        headers: dict[str, str] | None = None,
        *,
        body: bytes = b"",
        method: str | None = None,
    ) -> None:
        """Answer the next ``times`` matching requests with ``status``, then forward again."""
        self._add(_Rule("fail", re.compile(path_regex), method, times, status, body, headers))

    def fail_ratio(
        self,
        path_regex: str,
        status: int | Sequence[int] = (500, 503),
        ratio: float = 0.3,
        seed: int | str = 0,
        *,
        max_streak: int | None = None,
        headers: dict[str, str] | None = None,
        method: str | None = None,
    ) -> None:
        """Fail a seeded-random ``ratio`` of matching requests with ``status`` (or one of
        several statuses, also picked at random), forwarding the rest.

        Decisions are per method and path: the n-th request for a path gets the same
        answer for the same seed, however concurrent clients interleave. ``max_streak``
        caps how many requests in a row one path may fail (None: no cap).
        """
        statuses = (status,) if isinstance(status, int) else tuple(status)
        if not statuses or not 0.0 <= ratio <= 1.0:
            raise ValueError("fail_ratio needs at least one status and 0 <= ratio <= 1")
        self._add(_Rule(
            "fail", re.compile(path_regex), method, None, statuses[0], b"", headers,
            ratio=ratio, seed=seed, statuses=statuses, max_streak=max_streak,
        ))  # fmt: skip

    def fail_for(
        self,
        path_regex: str,
        seconds: float,
        status: int = 503,
        headers: dict[str, str] | None = None,
        *,
        body: bytes = b"",
        method: str | None = None,
    ) -> None:
        """An outage: answer every matching request with ``status`` for the next
        ``seconds`` (from now), then forward again."""
        until = time.monotonic() + seconds
        self._add(
            _Rule("fail", re.compile(path_regex), method, None, status, body, headers, until=until)
        )

    def flip_byte(
        self,
        path_regex: str,
        offset: int = 0,
        *,
        method: str | None = None,
        times: int | None = None,
    ) -> None:
        """XOR 0xFF into body byte ``offset`` of matching responses (if the body is that long)."""
        self._add(_Rule("flip", re.compile(path_regex), method, times, offset=offset))

    def reset_after(
        self, path_regex: str, nbytes: int, times: int | None = 1, *, method: str | None = None
    ) -> None:
        """Send headers (full Content-Length) and ``nbytes`` of the body, then close the socket.

        The client sees a short read; a shorter body passes intact.
        """
        self._add(_Rule("reset", re.compile(path_regex), method, times, offset=nbytes))

    def _take(self, kind: str, method: str, path: str) -> _Rule | None:
        with self._lock:
            for rule in self._rules:
                live = rule.kind == kind and rule.times != 0 and rule.method in (None, method)
                if not live or not rule.pattern.search(path):
                    continue
                if rule.until is not None and time.monotonic() >= rule.until:
                    continue
                chosen = rule.roll(method, path) if rule.ratio is not None else rule.status
                if chosen is None:
                    continue
                if rule.times is not None:
                    rule.times -= 1
                return rule if chosen == rule.status else replace(rule, status=chosen)
        return None

    def _handle(self, req: _Handler) -> None:
        with self._lock:
            self._inflight += 1
        status, sent, arrived = 502, 0, time.monotonic()
        try:
            status, sent = self._serve(req)
        finally:
            with self._lock:
                self._log.append(Hit(req.command, req.path, status, sent, arrived))
                self._inflight -= 1
                self._lock.notify_all()

    def _serve(self, req: _Handler) -> tuple[int, int]:
        body = req.read_body()
        canned = self._take("override", req.command, req.path)
        canned = canned or self._take("fail", req.command, req.path)
        if canned is not None:
            return canned.status, req.send_canned(canned.status, canned.headers or {}, canned.body)

        headers = {k: v for k, v in req.headers.items() if k.lower() not in _HOP_BY_HOP}
        headers["Host"] = f"{self._upstream_host}:{self._upstream_port}"
        conn = http.client.HTTPConnection(self._upstream_host, self._upstream_port, timeout=120)
        try:
            conn.request(req.command, req.path, body=body or None, headers=headers)
            resp = conn.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            return 502, req.send_canned(502, {}, f"proxy: upstream error {exc}\n".encode())
        try:
            flip = cut = hold = None
            if req.command != "HEAD":
                flip = self._take("flip", req.command, req.path)
                cut = self._take("reset", req.command, req.path)
                hold = self._hold_for(req.command, req.path)
            return resp.status, self._relay(req, resp, flip, cut, hold)
        finally:
            conn.close()

    def _relay(
        self, req: _Handler, resp: http.client.HTTPResponse, flip: _Rule | None,
        cut: _Rule | None, hold: Hold | None = None,
    ) -> int:
        req.send_response_only(resp.status, resp.reason)
        length = resp.getheader("Content-Length")
        for key, value in resp.getheaders():
            if key.lower() in _HOP_BY_HOP:
                continue
            if key.lower() == "location" and value.startswith(self.upstream):
                value = self.url + value[len(self.upstream) :]
            req.send_header(key, value)
        has_body = req.command != "HEAD" and resp.status not in (204, 304)
        chunked = has_body and length is None
        if length is not None:
            req.send_header("Content-Length", length)
        if chunked:
            req.send_header("Transfer-Encoding", "chunked")
        req.end_headers()
        if not has_body:
            return 0
        sent = 0
        try:
            while chunk := resp.read(_CHUNK):
                if flip is not None and sent <= flip.offset < sent + len(chunk):
                    mutable = bytearray(chunk)
                    mutable[flip.offset - sent] ^= 0xFF
                    chunk = bytes(mutable)
                if cut is not None and sent + len(chunk) >= cut.offset:
                    req.write(chunk[: cut.offset - sent], chunked)
                    req.cut()
                    return cut.offset
                if hold is not None:
                    stop = hold.stop_at(int(length) if length else None)
                    if stop is None:  # released before this body got there
                        hold = None
                    elif sent + len(chunk) > stop:
                        # Up to the hold, flushed so the client has it all, then wait.
                        head, chunk = chunk[: max(0, stop - sent)], chunk[max(0, stop - sent) :]
                        req.write(head, chunked)
                        sent += len(head)
                        req.wfile.flush()
                        hold.block(req.path)
                        hold = None
                req.write(chunk, chunked)
                sent += len(chunk)
            if chunked:
                req.wfile.write(b"0\r\n\r\n")
        except (OSError, http.client.HTTPException):  # client went away or upstream broke
            req.close_connection = True
        return sent


def _matching(hits: list[Hit], method: str | None, path_regex: str) -> int:
    pattern = re.compile(path_regex)
    return sum(1 for h in hits if method in (None, h.method) and pattern.search(h.path))


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: ThreadingHTTPServer

    def _dispatch(self) -> None:
        self.server.proxy._handle(self)  # type: ignore[attr-defined]

    do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = _dispatch

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                parts.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return b"".join(parts)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def send_canned(self, status: int, headers: dict[str, str], body: bytes) -> int:
        self.send_response_only(status)
        for key, value in headers.items():
            if key.lower() != "content-length":
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command == "HEAD":
            return 0
        self.wfile.write(body)
        return len(body)

    def write(self, data: bytes, chunked: bool) -> None:
        if chunked and data:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        elif data:
            self.wfile.write(data)

    def cut(self) -> None:
        """Flush what was sent, then close the socket mid-body."""
        self.wfile.flush()
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
