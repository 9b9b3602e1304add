"""The one retry policy: which errors are retried, how often, how long apart, until when.

Only `TransientError`s are retried (timeouts, resets, 408/429/5xx, a remote tier that did
not answer); everything else fails at once. Each request is retried at exactly one level:

    manifests, configs   RegistryClient, one `run` per document
    layer blobs          stages.fetch, one `run` per blob: a retry resumes with Range from
                         the bytes already verified, and an attempt that made progress
                         does not count against `attempts`
    Celery tasks         never retry a registry error again: a fetch retries only while a
                         lease is busy, a node's publish while the remote tier is down (the
                         node is warm meanwhile; workers/tasks.py), and a killed worker's
                         message comes back by itself (acks_late)

Worst case for one blob with the defaults: `attempts` (5) GETs per repository that holds it
(each may first answer 401 and be sent again with a token): 10 per repository, more only
while a cut download keeps making progress. Waits between attempts grow from `base` to
`cap` with jitter (0.5, 1, 2, 4 s, each times 0.5-1: 3.75-7.5 s in all). A `Retry-After`
is honoured up to `max_retry_after`; one that asks for longer ends the retries at once
with a message saying so (and a 429's pause of the host, shared by a fleet through Redis,
lasts at most `max_retry_after`). Nothing waits past the layer's `deadline`. A registry
that answers 500 to everything fails a layer in under 8 seconds of waiting.

How long one attempt may take (pipeline/registry/deadline.py): a document (manifest,
config, token, error body) has `request_deadline` for all of it, connect to last byte; a
blob has it until its headers, then must keep moving: a window of `stall` seconds without
64 KiB cuts it. Either is a TransientError, retried like a timeout, so a server that
trickles a byte at a time fails a request in `attempts` x `request_deadline` at most.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from pipeline.errors import TransientError, UsageError

log = logging.getLogger("layerwarm")
T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5              # tries of one request without progress (1 + 4 retries)
    base: float = 0.5              # seconds before the first retry ...
    cap: float = 8.0               # ... doubling up to this
    max_retry_after: float = 60.0  # a longer Retry-After is cut to this
    deadline: float = 600.0        # seconds one layer (or document) may spend retrying
    request_deadline: float = 60.0  # seconds one attempt at a document may take, all in
    stall: float = 30.0            # seconds a blob body may go without 64 KiB arriving

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> RetryPolicy:
        return cls(
            attempts=int(_number(env, "LAYERWARM_RETRY_ATTEMPTS", cls.attempts, whole=True)),
            max_retry_after=_number(env, "LAYERWARM_MAX_RETRY_AFTER", cls.max_retry_after),
            deadline=_number(env, "LAYERWARM_LAYER_DEADLINE", cls.deadline),
            request_deadline=_number(env, "LAYERWARM_REQUEST_DEADLINE", cls.request_deadline),
            stall=_number(env, "LAYERWARM_STALL_SECONDS", cls.stall),
        )

    def retry_after(self, seconds: float | None) -> float | None:
        """A server's Retry-After as we honour it: capped at `max_retry_after`."""
        return None if seconds is None else min(max(seconds, 0.0), self.max_retry_after)

    def delay(self, failures: int, error: TransientError) -> float:
        """Seconds to wait after `failures` failed attempts in a row (1 for the first)."""
        backoff = min(self.cap, self.base * 2 ** (failures - 1)) * random.uniform(0.5, 1.0)
        honoured = self.retry_after(error.retry_after)
        return backoff if honoured is None else max(backoff, honoured)

    def start(self, what: str) -> Attempts:
        return Attempts(self, what)

    def run(self, attempt: Callable[[], T], what: str,
            sleep: Callable[[float], None] = time.sleep) -> T:
        """Call `attempt` until it returns, retrying transient errors by this policy."""
        tries = self.start(what)
        while True:
            try:
                return attempt()
            except TransientError as e:
                sleep(tries.failed(e))


class Attempts:
    """The retries of one request (or one blob): counts failures, watches the deadline.

    `failed(e)` returns how long to wait before the next attempt, or raises `e` when the
    policy says to stop. `progressed()` says an attempt got somewhere (bytes arrived), so
    the next failure counts as the first again; the deadline still bounds the whole.
    """

    def __init__(self, policy: RetryPolicy, what: str) -> None:
        self.policy, self.what = policy, what
        self.failures = 0
        self._deadline = time.monotonic() + policy.deadline

    def progressed(self) -> None:
        self.failures = 0

    def failed(self, error: TransientError) -> float:
        self.failures += 1
        if self.failures >= self.policy.attempts:
            raise error
        if error.retry_after is not None and error.retry_after > self.policy.max_retry_after:
            # Waiting that long would hold a slot and the digest's lock: say so, and stop.
            raise TransientError(
                f"{error} (it asks to wait {error.retry_after:.0f} s, more than "
                f"LAYERWARM_MAX_RETRY_AFTER={self.policy.max_retry_after:.0f} s)") from error
        wait = self.policy.delay(self.failures, error)
        left = self._deadline - time.monotonic()
        if wait >= left:
            raise TransientError(
                f"{error} (gave up: retrying would pass the {self.policy.deadline:.0f} s "
                "deadline, LAYERWARM_LAYER_DEADLINE)") from error
        log.info("%s; retry %d/%d in %.1fs", error, self.failures,
                    self.policy.attempts - 1, wait)
        return wait


def _number(env: Mapping[str, str], name: str, default: float, *, whole: bool = False) -> float:
    raw = env.get(name)
    if not raw:
        return default
    try:
        value = int(raw) if whole else float(raw)
    except ValueError:
        raise UsageError(f"{name}={raw!r} is not a {'whole ' if whole else ''}number") from None
    if value <= 0:
        raise UsageError(f"{name}={raw} must be greater than 0")
    return value


DEFAULT_POLICY = RetryPolicy()
