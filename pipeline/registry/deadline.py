"""Deadlines for registry requests: a server that trickles cannot hold a request forever.

requests' `timeout` bounds each socket operation (the connect, one read). A server that
sends a byte every few seconds never trips it: a manifest so trickled was still being read
minutes later. A `Deadline` bounds a whole request instead, headers and body:

- While `deadline.current()` is active in a thread, each connection that thread sends a
  request on attaches itself to the deadline (the connections of `WatchedAdapter`).
- When the deadline passes, a watchdog thread shuts its connections' sockets down. A
  read blocked on one returns at once, urllib3 raises a connection error, and the
  client, seeing `expired`, reports the deadline (`why`) instead of a lost connection.
- The clock starts as a request is sent (`start`), so a wait for the rate budget does not
  count, and each redirect hop has the full time. `restart` moves the deadline: a blob
  body stays alive by its progress (client.BlobStream), so a slow but moving download is
  not cut.

The TCP connect is not interruptible this way; the client caps requests' connect timeout
at the deadline instead.
"""

from __future__ import annotations

import heapq
import itertools
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

_CURRENT = threading.local()
_OWNER = "_layerwarm_deadline"


class Deadline:
    """The time by which one request must be done; see the module docstring.

    The clock runs from `start()`, called as each request is sent: what comes before (a
    wait for the registry's rate budget) does not count.
    """

    def __init__(self, seconds: float, why: str) -> None:
        self.seconds = seconds
        self.why = why  # what the request's error says when the deadline cuts it
        self.expired = False
        self._at = time.monotonic() + seconds
        self._closed = False
        self._watched = False  # in the watchdog's queue
        self._conns: list[HTTPConnection] = []

    def start(self) -> None:
        """A request goes out now: it has `seconds` from here (a redirect hop starts again;
        the hop before it was done in time, or it would have failed)."""
        self.restart(self.seconds)
        self.expired = False  # after the move: a check that came due before it is void

    def restart(self, seconds: float, why: str | None = None) -> None:
        """The deadline is now `seconds` away (cheap: the watchdog checks when it is due)."""
        self._at = time.monotonic() + seconds
        if why is not None:
            self.why = why
        if not self._watched:
            with _watchdog.lock:
                if not (self._watched or self._closed):
                    _watchdog.watch(self)

    @contextmanager
    def current(self) -> Iterator[Deadline]:
        """Requests this thread sends meanwhile are bound by this deadline."""
        previous = getattr(_CURRENT, "deadline", None)
        _CURRENT.deadline = self
        try:
            yield self
        finally:
            _CURRENT.deadline = previous

    def close(self) -> None:
        """The request is over: nothing is cut from now on."""
        with _watchdog.lock:
            self._closed = True
            for conn in self._conns:
                if getattr(conn, _OWNER, None) is self:
                    setattr(conn, _OWNER, None)
            self._conns.clear()

    def _due(self) -> None:
        """The watchdog's call (its lock held) at the time this deadline was queued for."""
        self._watched = False
        if self._closed:
            return
        if self._at > time.monotonic():  # restarted since it was queued
            _watchdog.watch(self)
            return
        self.expired = True
        for conn in self._conns:
            if getattr(conn, _OWNER, None) is self:
                _shut(conn)


class _Watchdog:
    """One thread for every deadline of the process, waking when the next one is due (a
    timer thread per request cost a thread start each).

    `lock` also guards every deadline's connections and each connection's owner: a
    connection goes back to the pool and on to another request, whose deadline must not
    be the one to cut it.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._wake = threading.Condition(self.lock)
        self._queue: list[tuple[float, int, Deadline]] = []  # closed ones leave when due
        self._order = itertools.count()
        self._thread: threading.Thread | None = None

    def watch(self, deadline: Deadline) -> None:  # with `lock` held
        deadline._watched = True
        heapq.heappush(self._queue, (deadline._at, next(self._order), deadline))
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="layerwarm-deadlines",
                                            daemon=True)
            self._thread.start()
        elif self._queue[0][2] is deadline:  # due before what the thread waits for
            self._wake.notify()

    def _run(self) -> None:
        with self.lock:
            while True:
                now = time.monotonic()
                while self._queue and self._queue[0][0] <= now:
                    heapq.heappop(self._queue)[2]._due()
                self._wake.wait(self._queue[0][0] - now if self._queue else None)


_watchdog = _Watchdog()


def _after_fork() -> None:
    # A forked child (a Celery worker) has no watchdog thread, and maybe a lock held by it.
    global _watchdog
    _watchdog = _Watchdog()


os.register_at_fork(after_in_child=_after_fork)


def current() -> Deadline | None:
    """This thread's current deadline, if any."""
    return getattr(_CURRENT, "deadline", None)


def _attach(conn: HTTPConnection) -> None:
    deadline = current()
    with _watchdog.lock:
        setattr(conn, _OWNER, deadline)
        if deadline is not None and not deadline._closed:
            deadline._conns.append(conn)


def _shut(conn: HTTPConnection) -> None:
    sock = getattr(conn, "sock", None)
    if isinstance(sock, socket.socket):
        try:
            # socket.socket's own shutdown, for an SSLSocket too: it wakes the read blocked
            # in the other thread without tearing the TLS object down under it.
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
        except OSError:
            pass  # already closed


class _Watched:
    """A urllib3 connection that attaches to the sending thread's deadline per request."""

    def request(self, *args: Any, **kwargs: Any) -> None:
        _attach(self)  # type: ignore[arg-type]
        super().request(*args, **kwargs)  # type: ignore[misc]


class _HTTPConnection(_Watched, HTTPConnection):
    pass


class _HTTPSConnection(_Watched, HTTPSConnection):
    pass


class _HTTPPool(HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


_POOLS = {"http": _HTTPPool, "https": _HTTPSPool}


class WatchedAdapter(HTTPAdapter):
    """requests' adapter, with connections that `Deadline`s can cut (also through an HTTP
    proxy; a SOCKS proxy's own connections are not watched)."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _POOLS

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        if not proxy.lower().startswith("socks"):
            manager.pool_classes_by_scheme = _POOLS
        return manager
