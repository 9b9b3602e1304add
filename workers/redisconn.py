"""One way to make a Redis client: with connect and socket timeouts.

A client without a socket timeout waits forever on a half-open connection (a peer that
vanished without a FIN, a NAT that dropped the flow): the lease renewer stalls on it and
every lease of the process lapses while it waits. With these timeouts a command fails
with `redis.TimeoutError` instead, and the caller's next round reconnects.
"""

from __future__ import annotations

import os

import redis

# Seconds. The socket timeout bounds one command's round trip, so it must exceed the
# slowest command we send (none blocks: no BLPOP on these clients; Celery's own blocking
# reads use kombu's connections, configured in workers/app.py).
CONNECT_TIMEOUT = float(os.environ.get("LAYERWARM_REDIS_CONNECT_TIMEOUT") or 5)
SOCKET_TIMEOUT = float(os.environ.get("LAYERWARM_REDIS_SOCKET_TIMEOUT") or 10)
# A pooled connection idle this long is pinged before use, so a dead one is found on a
# cheap PING and replaced, not on the command that mattered.
HEALTH_CHECK_INTERVAL = 30


def connect(url: str, *, connect_timeout: float | None = None,
            socket_timeout: float | None = None) -> redis.Redis:
    """A client for `url` whose connect and every command fail within bounded time."""
    return redis.Redis.from_url(
        url,
        socket_connect_timeout=CONNECT_TIMEOUT if connect_timeout is None else connect_timeout,
        socket_timeout=SOCKET_TIMEOUT if socket_timeout is None else socket_timeout,
        socket_keepalive=True,
        health_check_interval=HEALTH_CHECK_INTERVAL,
    )
