"""One live worker host per node name: a registration in Redis the host keeps alive.

    layerwarm:node:<name>   JSON {"host", "pid", "since", "run"}, set with NX and a ttl

Two hosts under one name share one set of queues: a layer fetched by one "a" would be
decompressed on the other, whose disk has no staging file, and the job never ends. So
`layerwarm worker` claims its name before starting any Celery worker and refuses to start
when another live host holds it. The supervisor renews the claim every ttl/3 and drops it
when it stops. A host that died without stopping (SIGKILL, power cut) leaves its claim
behind: it lapses after the ttl (LAYERWARM_NODE_TTL), and at once when the claim names this
machine and a pid that no longer runs, so restarting a crashed worker never waits.

`run` names this start of the host. Its workers write it into the layer records they
touch, so the sweeper can tell a layer whose worker is gone (the node's claim lapsed, or
names another run: the host was restarted) from one whose worker is merely busy.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid

import redis

from pipeline.errors import UsageError

# KEYS: claim. ARGV: our value, ttl ms. Renew only our own claim (not a successor's).
_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""

# KEYS: claim. ARGV: our value.
_DROP = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('del', KEYS[1])
end
return 0
"""

# KEYS: claim. ARGV: the stale value, our value, ttl ms. Take over only what was judged.
_REPLACE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('set', KEYS[1], ARGV[2], 'PX', ARGV[3])
end
return false
"""


_PREFIX = "layerwarm:node:"


def claim_key(node: str) -> str:
    return _PREFIX + node


def claimed_nodes(client: redis.Redis) -> list[str]:
    """The names every live host holds now (a lapsed claim is gone from Redis)."""
    return sorted(key.decode()[len(_PREFIX):]
                  for key in client.scan_iter(match=_PREFIX + "*", count=1000))


class NodeTaken(UsageError):
    """Another live `layerwarm worker` holds this node name."""


def _pid_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: it runs
    return True


class NodeClaim:
    """This host's claim on its node name; see the module docstring."""

    def __init__(self, client: redis.Redis, node: str, ttl: float) -> None:
        self.client = client
        self.node = node
        self.ttl_ms = max(1000, int(ttl * 1000))
        self.key = claim_key(node)
        self.host = socket.gethostname()
        self.run = uuid.uuid4().hex
        self.value = json.dumps({"host": self.host, "pid": os.getpid(), "since": time.time(),
                                 "run": self.run})
        self._renew = client.register_script(_RENEW)
        self._drop = client.register_script(_DROP)
        self._replace = client.register_script(_REPLACE)

    def claim(self) -> None:
        """Take the name, or raise NodeTaken naming where the live holder runs."""
        for _ in range(5):  # only a race with another starting host loops
            if self.client.set(self.key, self.value, nx=True, px=self.ttl_ms):
                return
            other = self.client.get(self.key)
            if other is None:
                continue  # lapsed meanwhile
            holder = _holder(other)
            if not self._dead(holder):
                raise NodeTaken(
                    f"node {self.node} is already live on {holder.get('host', '?')} "
                    f"(pid {holder.get('pid', '?')}); stop it there or choose another --node")
            if self._replace(keys=[self.key], args=[other, self.value, self.ttl_ms]):
                return
        raise NodeTaken(f"node {self.node}: another host is claiming this name right now")

    def _dead(self, holder: dict) -> bool:
        """A claim of this machine whose pid no longer runs is a crashed host's."""
        pid = holder.get("pid")
        return holder.get("host") == self.host and isinstance(pid, int) and not _pid_runs(pid)

    def keep(self) -> None:
        """Renew the claim every ttl/3 from a daemon thread, for as long as the process runs."""
        def loop() -> None:
            while True:
                time.sleep(self.ttl_ms / 3000)
                self.renew()

        threading.Thread(target=loop, name="node-claim", daemon=True).start()

    def renew(self) -> None:
        """Keep the claim alive; Redis trouble is skipped (the next round tries again)."""
        try:
            self._renew(keys=[self.key], args=[self.value, self.ttl_ms])
        except redis.RedisError:
            pass

    def drop(self) -> None:
        try:
            self._drop(keys=[self.key], args=[self.value])
        except redis.RedisError:
            pass  # it lapses after the ttl


def current_run(client: redis.Redis, node: str) -> str | None:
    """The run of the host that holds `node` now: None when no live host does, "" when
    its claim names no run."""
    raw = client.get(claim_key(node))
    return None if raw is None else str(_holder(raw).get("run") or "")


def _holder(raw: bytes) -> dict:
    try:
        value = json.loads(raw)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
