"""A request budget per registry host, so a fleet stays under a registry's rate limit.

`RateLimiter` is what the registry client asks before every request; `penalize` is what
it says after a 429, so every user of the limiter backs off for that host, not only the
one that was told. `LocalRateLimiter` is a token bucket for one process (the embedded
runner); workers/ratelimit.py holds the Redis one that all workers of a fleet share.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Protocol


class RateLimiter(Protocol):
    def acquire(self, host: str) -> None:
        """Block until one request to `host` fits the budget."""
        ...

    def penalize(self, host: str, seconds: float) -> None:
        """`host` said 429: nobody sends it anything for `seconds`."""
        ...


class Unlimited:
    def acquire(self, host: str) -> None:
        pass

    def penalize(self, host: str, seconds: float) -> None:
        pass


class LocalRateLimiter:
    """Token bucket per host: `rate` requests a second, bursts of up to `burst`."""

    def __init__(
        self, rate: float, burst: float | None = None, *,
        clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.rate, self.burst = rate, burst if burst is not None else max(1.0, rate)
        self._clock, self._sleep = clock, sleep
        self._lock = threading.Lock()
        self._tokens: dict[str, tuple[float, float]] = {}  # host -> (tokens, at)
        self._blocked_until: dict[str, float] = {}

    def acquire(self, host: str) -> None:
        while True:
            wait = self._take(host)
            if wait <= 0:
                return
            self._sleep(wait)

    def _take(self, host: str) -> float:
        """Take a token and return 0, or return how long to wait for one."""
        with self._lock:
            now = self._clock()
            blocked = self._blocked_until.get(host, 0.0) - now
            if blocked > 0:
                return blocked
            tokens, at = self._tokens.get(host, (self.burst, now))
            tokens = min(self.burst, tokens + (now - at) * self.rate)
            if tokens >= 1:
                self._tokens[host] = (tokens - 1, now)
                return 0.0
            self._tokens[host] = (tokens, now)
            return (1 - tokens) / self.rate

    def penalize(self, host: str, seconds: float) -> None:
        with self._lock:
            until = self._clock() + seconds
            self._blocked_until[host] = max(self._blocked_until.get(host, 0.0), until)
            self._tokens[host] = (0.0, until)  # and no burst right after the pause
