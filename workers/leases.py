"""Per-digest Redis leases: one worker in the fleet fetches a layer from the registry.

A lease is a key `layerwarm:lease:<digest>` set with NX and a ttl. It is held by a
**node** (a host), not by a task: a fleet layer's chain runs as three tasks (fetch on the
IO worker, decompress on the CPU worker, publish on the IO worker again) and waits in a
queue between them, so no single task can keep it alive. Acquiring it also records it in
the node's hash `layerwarm:held:<node>` (digest -> "token since-ms"); every worker process of the
node runs one renewer thread that, every ttl/3, renews each lease in that hash. The lease
lives until `release` (after the publish) deletes both. If every process of the node
dies, nobody renews: the lease expires and another node takes over.

Every write checks the token (Lua), so a holder whose lease expired can never renew or
drop someone else's. A renew that finds the lease gone or held by another token marks it
lost: the renewer drops it from the hash and logs a warning, and `check` raises
`LeaseLost`, so the holder does not publish as if it still held it. A process that could
not reach Redis to renew a lease for longer than its ttl treats it as lost too.

A fetch that finds the lease busy can wait for it (`wait_free`): `release` publishes the
digest on RELEASED_CHANNEL, which one subscriber thread per worker process listens to
and wakes the threads waiting on that digest. A waiter subscribes before it asks whether
the lease is still held, so a release between the busy answer and the wait is not missed;
it asks again every RECHECK_EVERY seconds for a lease that lapsed without a release.

A lease is held for at most `max_hold` seconds (when set): a chain whose next message
was lost would otherwise keep its lease renewed for ever. The sweeper's new fetch of
that layer carries the lost chain's token when the layer's record shows it; one sent
without it would wait on the lease for ever.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import redis

from pipeline.digest import Digest
from pipeline.errors import InvalidDigest, TransientError

log = logging.getLogger("layerwarm")

# A node's record of a lease: "<token> <ms since the epoch it was taken>" (tokens have no
# spaces: node names cannot). One hash field per lease, so taking and dropping it are one
# HSET and one HDEL (a second hash for the times cost a command more each way).

# KEYS: lease, held hash. ARGV: token, ttl ms, digest, now ms.
# Take the lease (or confirm it is ours: a redelivered task) and record it for the node's
# renewers in the same step, so no lease exists that its node's renewers do not know.
# Returns 1, or the holder's token when another holds it (no second read to name it).
# Scripts run atomically: a key that the SET NX found cannot expire before the GET.
_ACQUIRE = """
if redis.call('set', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  redis.call('hset', KEYS[2], ARGV[3], ARGV[1] .. ' ' .. ARGV[4])
  return 1
end
local current = redis.call('get', KEYS[1])
if current ~= ARGV[1] then
  return current
end
redis.call('pexpire', KEYS[1], ARGV[2])
local mine = redis.call('hget', KEYS[2], ARGV[3])
if not mine or string.sub(mine, 1, #ARGV[1] + 1) ~= ARGV[1] .. ' ' then
  redis.call('hset', KEYS[2], ARGV[3], ARGV[1] .. ' ' .. ARGV[4])
end
return 1
"""

# KEYS: lease, held hash. ARGV: token, digest, channel.
# The hash field goes only if it is still this token's (a newer acquire keeps its own).
# A lease dropped is announced on the channel (the digest), to wake the fetches waiting.
_RELEASE = """
local mine = redis.call('hget', KEYS[2], ARGV[2])
if mine and string.sub(mine, 1, #ARGV[1] + 1) == ARGV[1] .. ' ' then
  redis.call('hdel', KEYS[2], ARGV[2])
end
if redis.call('get', KEYS[1]) == ARGV[1] then
  redis.call('del', KEYS[1])
  redis.call('publish', ARGV[3], ARGV[2])
  return 1
end
return 0
"""

# KEYS: held hash, then one lease key per lease.
# ARGV: ttl ms, now ms, max hold ms (-1: none), then digest and token per lease.
# Returns per lease: 1 renewed, 0 lost (gone or another token's; dropped from the hash),
# 2 released meanwhile (not ours to judge), 3 held past max_hold (dropped; it lapses).
_RENEW = """
local result = {}
local ttl, now, max_hold = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
for i = 2, #KEYS do
  local digest, token = ARGV[2 * i], ARGV[2 * i + 1]
  local mine = redis.call('hget', KEYS[1], digest)
  local status
  if not mine or string.sub(mine, 1, #token + 1) ~= token .. ' ' then
    status = 2
  else
    local since = tonumber(string.sub(mine, #token + 2)) or now
    if max_hold >= 0 and now - since > max_hold then
      status = 3
    elseif redis.call('get', KEYS[i]) == token then
      redis.call('pexpire', KEYS[i], ttl)
      status = 1
    else
      status = 0
    end
    if status ~= 1 then
      redis.call('hdel', KEYS[1], digest)
    end
  end
  result[#result + 1] = status
end
return result
"""

_RENEWED, _LOST, _RELEASED, _OVERHELD = 1, 0, 2, 3

# Where `release` announces a lease it dropped (the message: the digest). One channel for
# all digests: a worker process subscribes once, not once per wait.
RELEASED_CHANNEL = "layerwarm:lease-released"
# A waiter asks Redis itself this often: a holder that died lets its lease expire unannounced,
# and an announcement can be missed while the subscriber's connection is re-made.
RECHECK_EVERY = 10.0
SUBSCRIBE_TIMEOUT = 2.0  # how long a first waiter waits for the subscription to be confirmed


class LeaseLost(TransientError):
    """The lease expired or another worker took it over: do not act as its holder.

    Transient: the layer's task retries from the tiers with a new lease (another node
    may have finished the layer meanwhile, and the retry finds it in the remote tier).
    """


class Leases:
    """The fleet's per-digest leases, as seen by one worker process of `node`."""

    def __init__(self, client: redis.Redis, ttl: float, node: str | None = None, *,
                 max_hold: float | None = None, renew_every: float | None = None) -> None:
        self.client, self.ttl_ms = client, int(ttl * 1000)
        # The same default name the workers use (workers/tasks.py context()).
        self.node = node or os.environ.get("LAYERWARM_NODE") or socket.gethostname()
        self.max_hold_ms = -1 if max_hold is None else int(max_hold * 1000)
        self.renew_every = ttl / 3 if renew_every is None else renew_every
        self._acquire = client.register_script(_ACQUIRE)
        self._release = client.register_script(_RELEASE)
        self._renew = client.register_script(_RENEW)
        self._lock = threading.Lock()
        # (digest, token) -> monotonic time this process last saw it renewed (or taken):
        # how long a Redis outage has kept it unrenewed.
        self._known: dict[tuple[str, str], float] = {}
        # Leases this process judged lost; `check` refuses them even if Redis later says
        # otherwise (while it could not renew, someone else may have held the layer).
        self._lost: dict[tuple[str, str], str] = {}  # -> why
        self._renewer: threading.Thread | None = None
        self._renewer_pid = 0
        self._stop = threading.Event()
        self._watch = _ReleaseWatch(client)

    @staticmethod
    def key(digest: Digest) -> str:
        return f"layerwarm:lease:{digest.cache_name}"

    @property
    def held_key(self) -> str:
        """The node's hash of leases it holds (digest -> "token since-ms"), renewed by its
        workers."""
        return f"layerwarm:held:{self.node}"

    @staticmethod
    def new_token(node: str) -> str:
        return f"{node}:{uuid.uuid4().hex}"

    def acquire(self, digest: Digest, token: str) -> bool:
        """Take the lease for this node, or confirm we still hold it (a redelivered task).

        Once taken, the node's renewers keep it until `release`, across task handoffs.
        """
        return self.try_acquire(digest, token) is None

    def try_acquire(self, digest: Digest, token: str) -> str | None:
        """`acquire`, saying who holds the lease instead: None when it is ours now, else
        the holder's token (what `holder` would read, in the same command)."""
        self.start_renewer()
        now = time.time()
        answer = self._acquire(
            keys=[self.key(digest), self.held_key],
            args=[token, self.ttl_ms, str(digest), int(now * 1000)])
        if isinstance(answer, bytes | str):
            return _text(answer)
        with self._lock:
            self._known[(str(digest), token)] = time.monotonic()
            self._lost.pop((str(digest), token), None)
        return None

    def release(self, digest: Digest, token: str) -> None:
        """Drop the lease (only if `token` holds it) and the node's record of it."""
        self._release(keys=[self.key(digest), self.held_key],
                      args=[token, str(digest), RELEASED_CHANNEL])
        with self._lock:
            self._known.pop((str(digest), token), None)
            self._lost.pop((str(digest), token), None)

    def wait_free(self, digest: Digest, timeout: float) -> bool:
        """Block until the lease on `digest` is free or `timeout` seconds passed; say which.

        Woken by the holder's `release` (RELEASED_CHANNEL), and asks Redis every
        RECHECK_EVERY seconds for one that lapsed. Free means free when asked or
        announced: another worker may take it first, and the caller's next acquire says
        so (so does a wake when the subscriber's connection failed). Redis not answering
        ends the wait (False): the caller goes on as if the time had run out.
        """
        deadline = time.monotonic() + timeout
        with self._watch.watching(str(digest)) as woken:
            while True:
                try:
                    if self.holder(digest) is None:
                        return True
                except redis.RedisError as e:
                    log.warning("lease on %s: cannot wait for its release: %s", digest, e)
                    return False
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                if woken.wait(min(left, RECHECK_EVERY)):
                    return True  # released (no GET to confirm: the caller's acquire will)

    def holder(self, digest: Digest) -> str | None:
        value = self.client.get(self.key(digest))
        return value.decode() if isinstance(value, bytes) else value

    def check(self, digest: Digest, token: str) -> None:
        """Raise `LeaseLost` unless `token` still holds the lease.

        Call it before acting as the holder (publishing). Redis not answering also
        raises it: a holder that cannot confirm its lease must not act on it.
        """
        self.start_renewer()
        try:
            current = self.holder(digest)
        except redis.RedisError as e:
            raise LeaseLost(f"lease on {digest} cannot be confirmed: {e}") from e
        if current != token:
            raise LeaseLost(f"lease on {digest} lost: "
                            + (f"now held by {current}" if current else "expired"))
        with self._lock:
            why = self._lost.get((str(digest), token))
        if why is not None:
            raise LeaseLost(f"lease on {digest} lost: {why}")

    def is_lost(self, digest: Digest, token: str) -> bool:
        """Whether this process judged the lease lost (its renewer found it gone or taken,
        or could not renew it for over its ttl). `check` is the test that also asks Redis."""
        with self._lock:
            return (str(digest), token) in self._lost

    @contextmanager
    def kept(self, digest: Digest, token: str) -> Iterator[None]:
        """Kept for callers written before node-held leases: renewal no longer depends on
        it (the node's renewers keep every acquired lease until `release`); it only makes
        sure this process runs its renewer. New code calls `check` before publishing."""
        self.start_renewer()
        yield

    def start_renewer(self) -> None:
        """Start this process's renewer thread, once (again in a forked child).

        Every worker process of a node should call it at start, so the node's leases are
        renewed while any of its workers lives, whichever process took them.
        """
        with self._lock:
            alive = self._renewer is not None and self._renewer.is_alive()
            if alive and self._renewer_pid == os.getpid():
                return
            self._stop.clear()
            self._renewer_pid = os.getpid()
            self._renewer = threading.Thread(target=self._renew_loop, daemon=True,
                                             name="layerwarm-lease")
            self._renewer.start()

    def stop_renewer(self, timeout: float | None = None) -> None:
        """Stop this process's renewer (tests; a worker's renewer ends with the process).

        Waits up to `timeout` seconds (None: until it ends) for a round under way.
        """
        with self._lock:
            thread, self._renewer = self._renewer, None
        self._stop.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.renew_every):
            try:
                self.renew_held()
            except redis.RedisError as e:
                self._unreachable(e)
            except Exception:  # never let the renewer die quietly: every lease would lapse
                log.exception("lease renewer failed; trying again next round")

    def renew_held(self) -> list[tuple[str, str]]:
        """One round: renew every lease of this node; return those found lost.

        Raises `redis.RedisError` when Redis does not answer (the loop tries again).
        """
        raw = self.client.hgetall(self.held_key)
        held: list[tuple[str, str]] = []
        lease_keys: list[str] = []
        for field, record in sorted(raw.items()):
            token = _text(record).split(" ", 1)[0]
            try:
                lease_keys.append(self.key(Digest.parse(_text(field))))
            except InvalidDigest:
                # Not written by acquire; one bad field must not stop every renewal.
                log.warning("lease renewer: dropping %r from %s", field, self.held_key)
                self.client.hdel(self.held_key, field)
                continue
            held.append((_text(field), token))
        if not held:
            return []
        keys = [self.held_key, *lease_keys]
        args: list[str | int] = [self.ttl_ms, int(time.time() * 1000), self.max_hold_ms]
        for d, t in held:
            args += [d, t]
        statuses = self._renew(keys=keys, args=args)
        now = time.monotonic()
        lost = []
        with self._lock:
            for lease, status in zip(held, statuses, strict=True):
                if status == _RENEWED:
                    self._known[lease] = now
                    continue
                self._known.pop(lease, None)
                if status == _LOST:
                    self._lost[lease] = "expired or taken over"
                    lost.append(lease)
                    log.warning("lease on %s lost (expired or taken over); token %s",
                                lease[0], lease[1])
                elif status == _OVERHELD:
                    self._lost[lease] = f"held over {self.max_hold_ms / 1000:.0f}s"
                    lost.append(lease)
                    log.warning("lease on %s held over %.0fs; no longer renewed; token %s",
                                lease[0], self.max_hold_ms / 1000, lease[1])
            # Forget the leases released elsewhere (not in the hash any more).
            current = set(held)
            for lease in [k for k in self._known if k not in current]:
                del self._known[lease]
        return lost

    def _unreachable(self, error: redis.RedisError) -> None:
        """A round failed: leases this process has not renewed for over a ttl are lost."""
        now = time.monotonic()
        with self._lock:
            stale = [k for k, seen in self._known.items() if now - seen > self.ttl_ms / 1000]
            for lease in stale:
                del self._known[lease]
                self._lost[lease] = f"not renewed for over {self.ttl_ms / 1000:g}s"
        log.warning("lease renewer: Redis did not answer (%s)", error)
        for digest, token in stale:
            log.warning("lease on %s lost: not renewed for over %.0fs; token %s",
                        digest, self.ttl_ms / 1000, token)


class _ReleaseWatch:
    """One process's subscription to RELEASED_CHANNEL: wakes the threads waiting on a digest.

    Started by the first waiter (one connection and thread per process, kept for the
    process's life). If the connection fails, every waiter is woken to ask Redis itself,
    and the subscription is made again a second later.
    """

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._lock = threading.Lock()
        self._waiters: dict[str, set[threading.Event]] = {}
        self._subscribed = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid = 0

    @contextmanager
    def watching(self, digest: str) -> Iterator[threading.Event]:
        """An event set when `digest`'s lease is released; subscribed before it is given
        (or SUBSCRIBE_TIMEOUT passed: the waiter's own checks then carry it)."""
        event = threading.Event()
        with self._lock:
            self._waiters.setdefault(digest, set()).add(event)
            if self._thread is None or not self._thread.is_alive() or self._pid != os.getpid():
                self._subscribed.clear()
                self._pid = os.getpid()
                self._thread = threading.Thread(target=self._listen, daemon=True,
                                                name="layerwarm-lease-watch")
                self._thread.start()
        self._subscribed.wait(SUBSCRIBE_TIMEOUT)
        try:
            yield event
        finally:
            with self._lock:
                waiting = self._waiters.get(digest, set())
                waiting.discard(event)
                if not waiting:
                    self._waiters.pop(digest, None)

    def _wake(self, digest: str | None) -> None:
        with self._lock:
            events = [e for d, es in self._waiters.items() if digest in (None, d) for e in es]
        for event in events:
            event.set()

    def _listen(self) -> None:
        while True:
            pubsub = self.client.pubsub()
            try:
                pubsub.subscribe(RELEASED_CHANNEL)
                while True:
                    message = pubsub.get_message(timeout=1.0)
                    if message is None:
                        continue
                    if message["type"] == "subscribe":
                        self._subscribed.set()
                    elif message["type"] == "message":
                        self._wake(_text(message["data"]))
            except Exception as e:  # noqa: BLE001 - never die: waiters would sleep to their timeouts
                self._subscribed.clear()
                log.warning("lease release watch: %s; subscribing again", e)
                self._wake(None)
                time.sleep(1.0)
            finally:
                pubsub.close()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
