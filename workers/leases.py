"""Per-digest Redis leases: one worker in the fleet fetches a layer from the registry.

A lease is `SET key token NX PX ttl`; the holder renews it while it works and deletes it
when the layer is in the remote tier. Renew and release check the token (a Lua script),
so a worker whose lease expired can never drop someone else's. A dead holder stops
renewing, the lease expires, and a waiter takes over.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import redis

from pipeline.digest import Digest

_RENEW = "if redis.call('get', KEYS[1]) == ARGV[1] then " \
    "return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end"
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then " \
    "return redis.call('del', KEYS[1]) else return 0 end"


class Leases:
    def __init__(self, client: redis.Redis, ttl: float) -> None:
        self.client, self.ttl_ms = client, int(ttl * 1000)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)
        # Leases being kept, renewed by one thread per process (not one per task: a task
        # for a tiny layer spent more on starting and joining its thread than on the layer).
        self._kept: dict[int, tuple[Digest, str]] = {}
        self._lock = threading.Lock()
        self._renewer: threading.Thread | None = None

    @staticmethod
    def key(digest: Digest) -> str:
        return f"layerwarm:lease:{digest.cache_name}"

    @staticmethod
    def new_token(node: str) -> str:
        return f"{node}:{uuid.uuid4().hex}"

    def acquire(self, digest: Digest, token: str) -> bool:
        """Take the lease, or confirm we still hold it (a redelivered task of ours)."""
        if self.client.set(self.key(digest), token, nx=True, px=self.ttl_ms):
            return True
        return self.renew(digest, token)

    def renew(self, digest: Digest, token: str) -> bool:
        return bool(self._renew(keys=[self.key(digest)], args=[token, self.ttl_ms]))

    def release(self, digest: Digest, token: str) -> None:
        self._release(keys=[self.key(digest)], args=[token])

    def holder(self, digest: Digest) -> str | None:
        value = self.client.get(self.key(digest))
        return value.decode() if isinstance(value, bytes) else value

    @contextmanager
    def kept(self, digest: Digest, token: str) -> Iterator[None]:
        """Renew the lease every third of its ttl while the block runs."""
        entry = object()
        with self._lock:
            self._kept[id(entry)] = (digest, token)
            if self._renewer is None:
                self._renewer = threading.Thread(target=self._renew_kept, daemon=True,
                                                 name="layerwarm-lease")
                self._renewer.start()
        try:
            yield
        finally:
            with self._lock:
                del self._kept[id(entry)]

    def _renew_kept(self) -> None:
        while True:
            time.sleep(self.ttl_ms / 3000)
            with self._lock:
                kept = list(self._kept.values())
            for digest, token in kept:
                try:
                    self.renew(digest, token)
                except redis.RedisError:
                    pass  # next round may reach Redis again; expiry is the safety net
