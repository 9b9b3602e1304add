"""One way to make a Redis client: with connect and socket timeouts.

A client without a socket timeout waits forever on a half-open connection (a peer that
vanished without a FIN, a NAT that dropped the flow): the lease renewer stalls on it and
every lease of the process lapses while it waits. With these timeouts a command fails
with `redis.TimeoutError` instead, and the caller's next round reconnects.
"""

from __future__ import annotations

import os
import re
from urllib.parse import urlsplit

import redis
import redis.connection

from pipeline.errors import BrokerUnavailable, UsageError

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


# Schemes redis-py connects to. Celery would take amqp:// and others too, but layerwarm
# keeps its jobs, leases and progress in Redis itself (workers/jobs.py, leases.py).
REDIS_SCHEMES = ("redis", "rediss", "unix")
WHERE = "set --broker, LAYERWARM_BROKER_URL or LAYERWARM_BROKER_URL_FILE"


def masked(url: str) -> str:
    """`url` with its password replaced by `**`, for messages (it may not even parse)."""
    return re.sub(r"(://[^:/@]*:)[^@/]*@", r"\1**@", url)


def check_url(url: str) -> None:
    """Refuse a broker URL that is not a well-formed Redis URL, before anything connects."""
    scheme = urlsplit(url).scheme.lower()
    if scheme not in REDIS_SCHEMES:
        raise UsageError(
            f"broker {masked(url)}: only Redis is supported (redis://HOST:PORT/DB, rediss:// "
            f"or unix://): layerwarm keeps its jobs and leases in Redis; {WHERE}")
    try:
        redis.connection.parse_url(url)
    except ValueError as e:
        raise UsageError(f"broker {masked(url)}: malformed Redis URL ({e}); {WHERE}") from None


def check_broker(url: str) -> None:
    """Fail in one line, within the connect/socket timeouts, when Redis at `url` is not usable.

    Checked once before a command starts: otherwise a worker, beat or Flower retries a
    refused broker forever with a page of log lines, and nodes/submit fail with a trace.
    """
    check_url(url)
    client = connect(url)
    try:
        client.ping()
    except (redis.ConnectionError, redis.TimeoutError) as e:
        if isinstance(e, redis.AuthenticationError):  # a ConnectionError, but Redis is there
            raise BrokerUnavailable(f"broker {masked(url)}: {e} ({WHERE})") from None
        raise BrokerUnavailable(
            f"broker {masked(url)}: {e} Is Redis running there? ({WHERE})") from None
    except redis.RedisError as e:  # it answered, but not as we need (a NOAUTH, a bad db)
        raise BrokerUnavailable(f"broker {masked(url)}: {e} ({WHERE})") from None
    finally:
        client.close()
