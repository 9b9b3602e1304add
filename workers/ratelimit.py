"""The fleet-wide registry budget: one token bucket per registry host, kept in Redis.

Every worker takes its tokens from the same bucket (a Lua script, so take-or-wait is one
atomic step on Redis's clock), and a 429 seen by any worker pauses the host for all.
"""

from __future__ import annotations

import time

import redis

# KEYS: bucket, pause. ARGV: rate/s, burst. Returns ms to wait (0: token taken).
_TAKE = """
local pause = redis.call('pttl', KEYS[2])
if pause > 0 then return pause end
local now = redis.call('time')
local t = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local state = redis.call('hmget', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1]) or burst
local at = tonumber(state[2]) or t
tokens = math.min(burst, tokens + (t - at) * rate / 1000)
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = math.ceil((1 - tokens) * 1000 / rate) end
redis.call('hset', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(t))
redis.call('pexpire', KEYS[1], 60000)
return wait
"""


class RedisRateLimiter:
    def __init__(self, client: redis.Redis, rate: float, burst: float | None = None) -> None:
        self.client, self.rate = client, rate
        self.burst = burst if burst is not None else max(1.0, rate)
        self._take = client.register_script(_TAKE)

    @staticmethod
    def _keys(host: str) -> list[str]:
        return [f"layerwarm:rate:{host}", f"layerwarm:rate:{host}:pause"]

    def acquire(self, host: str) -> None:
        while True:
            wait_ms = int(self._take(keys=self._keys(host), args=[self.rate, self.burst]))
            if wait_ms <= 0:
                return
            time.sleep(wait_ms / 1000)

    def penalize(self, host: str, seconds: float) -> None:
        pause = self._keys(host)[1]
        ms = max(1, int(seconds * 1000))
        # Only lengthen a pause another worker set, never shorten it.
        if (self.client.pttl(pause) or 0) < ms:
            self.client.set(pause, "1", px=ms)
