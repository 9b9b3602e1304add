"""Job records in Redis: what a submitted job is, and the state of each of its layers.

    layerwarm:job:<id>          hash: refs, target, platform, created, planned, failures
    layerwarm:job:<id>:layers   hash: "<digest>|<target>" -> JSON layer record (its plan,
                                its end, what the sweeper changed), and
                                "<digest>|<target>|p" -> JSON progress of a running stage
    layerwarm:jobs:active       sorted set of jobs not known to be finished (for the sweeper)
    layerwarm:jobs:recent       sorted set of every job by creation time (for `layerwarm jobs`)
    layerwarm:job:<id>:events   pub/sub channel: a message each time a layer finishes (and
                                when the plan is recorded), so `--wait` ends at once

Both hashes expire the job TTL after the plan is recorded: a layer's state change keeps
that TTL rather than setting it again (an EXPIRE and a MULTI/EXEC less per change). A
job's overall state is derived from its layers when read, so no writer has to keep a
summary consistent.

Progress (a stage starting, its bytes, a fetch waiting on a lease) is most of a layer's
writes, so it goes to its own field, written whole without reading the record first: one
command. A reader lays it over the record when it is newer and the record has not
finished; so a late progress write can never reopen a finished layer, which is what the
record's read-then-write used to guard against.
"""

from __future__ import annotations

import json
import re
import threading
import time
from typing import Any

import redis

from pipeline.errors import UsageError

# "cancelled": `layerwarm cancel` stopped the layer before its chain started.
FINISHED = ("done", "failed", "cancelled")
_JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,63}")
_PROGRESS = "|p"  # suffix of a layer's progress field in the layers hash
_CANCEL_READS_KEPT = 256  # jobs whose cancel flag a store remembers (`cancelled`)
ACTIVE = "layerwarm:jobs:active"
RECENT = "layerwarm:jobs:recent"


def check_job_id(job_id: str) -> str:
    if not _JOB_ID.fullmatch(job_id or ""):
        raise UsageError(f"invalid job id {job_id[:80]!r}")
    return job_id


class JobStore:
    def __init__(self, client: redis.Redis, ttl: float) -> None:
        self.client, self.ttl = client, int(ttl)
        self._cancel_reads: dict[str, tuple[float, bool]] = {}  # job -> (monotonic, flag)
        self._cancel_lock = threading.Lock()

    @staticmethod
    def _key(job_id: str) -> str:
        return f"layerwarm:job:{check_job_id(job_id)}"

    @classmethod
    def events_channel(cls, job_id: str) -> str:
        """Where a message goes each time one of the job's layers finishes."""
        return cls._key(job_id) + ":events"

    def create(self, job_id: str, refs: list[str], target: str, platform: str | None) -> None:
        key = self._key(job_id)
        with self.client.pipeline() as p:
            p.hset(key, mapping={
                "id": job_id, "refs": json.dumps(refs), "target": target,
                "platform": platform or "", "created": repr(time.time()), "planned": "0",
                "image_failures": "[]",
            })
            p.expire(key, self.ttl)
            p.zadd(ACTIVE, {job_id: time.time()})
            p.zadd(RECENT, {job_id: time.time()})
            p.execute()

    def planned(
        self, job_id: str, layers: list[dict[str, Any]], image_failures: list[dict[str, str]],
        images: list[dict[str, Any]] | None = None,
    ) -> None:
        """Record the job's layers (all pending), the refs that could not be resolved, and
        the images (manifest digest, ref, platform, layer digests) for the nodes' caches."""
        key = self._key(job_id)
        with self.client.pipeline() as p:
            if layers:
                now = time.time()
                records = {f"{x['digest']}|{x['target']}": json.dumps(
                    {**x, "state": "pending", "updated": now}) for x in layers}
                # Progress fields exist from the start: a progress write then finds its
                # field there, and one that makes it means the hash had expired.
                p.hset(key + ":layers", mapping={
                    **records, **{k + _PROGRESS: "{}" for k in records}})
                p.expire(key + ":layers", self.ttl)
            p.hset(key, mapping={"planned": "1", "image_failures": json.dumps(image_failures),
                                 "images": json.dumps(images or [])})
            p.expire(key, self.ttl)
            p.publish(self.events_channel(job_id), "planned")
            p.execute()

    def progress_layer(self, job_id: str, digest: str, target: str, **fields: Any) -> None:
        """Say where a running layer is (its stage, bytes, host; a fetch waiting on a
        lease): one HSET, no read. Shown while newer than the record and the layer is not
        finished; `update_layer` records an end."""
        if fields.get("state") in FINISHED:
            raise ValueError(f"progress cannot finish a layer ({fields['state']})")
        key = self._key(job_id) + ":layers"
        made = self.client.hset(key, f"{digest}|{target}{_PROGRESS}",
                                json.dumps({**fields, "updated": time.time()}))
        if made:  # planned() makes every progress field: the hash had expired
            self.client.expire(key, self.ttl)

    def update_layer(self, job_id: str, digest: str, target: str, **fields: Any) -> None:
        """Merge `fields` into one layer's record: its end (done, failed, cancelled) or
        what the sweeper changed. Last writer wins, which is fine: each layer of a job
        has one chain of tasks, and they run one after another."""
        key = self._key(job_id) + ":layers"
        field = f"{digest}|{target}"
        raw = self.client.hget(key, field)
        state = json.loads(raw) if raw else {"digest": digest, "target": target}
        was_finished = state.get("state") in FINISHED
        if was_finished and fields.get("state") not in FINISHED:
            return  # a late write must not reopen a finished layer
        state.update(fields, updated=time.time())
        # One round trip, no MULTI/EXEC: the HSET and the PUBLISH need no isolation (a
        # follower reads the record after the message, and the HSET went first). The TTL
        # was set when the job was planned and an HSET keeps it; only a field created here
        # (the record expired, or was never planned) needs it set again. A layer is
        # announced when it finishes, not again when a finished one changes (its publish).
        with self.client.pipeline(transaction=False) as p:
            p.hset(key, field, json.dumps(state))
            if fields.get("state") in FINISHED and not was_finished:
                p.publish(self.events_channel(job_id), field)
            created = p.execute()[0]
        if created:
            self.client.expire(key, self.ttl)

    def layer_state(self, job_id: str, digest: str, target: str) -> str | None:
        """One layer's state (pending, fetching, ..., done, failed), or None if unknown."""
        field = f"{digest}|{target}"
        raw, progress = self.client.hmget(self._key(job_id) + ":layers",
                                          field, field + _PROGRESS)
        return _as_shown(raw, progress).get("state") if raw else None

    def layers(self, job_id: str) -> list[dict[str, Any]]:
        """Every layer of the job as shown: its record, with its progress laid over it."""
        return _shown(self.client.hgetall(self._key(job_id) + ":layers"))

    def images(self, job_id: str) -> list[dict[str, Any]]:
        """The images the job's plan resolved (see `planned`); [] if unknown or expired."""
        raw = self.client.hget(self._key(job_id), "images")
        return json.loads(raw) if raw else []

    def stalled(self, older_than: float
                ) -> list[tuple[str, dict[str, Any], list[dict[str, Any]]]]:
        """Unfinished layers of active jobs whose record nobody touched for `older_than` s,
        each with every layer record of its job (read here anyway: the sweeper looks up
        the other targets of a layer in them).

        A running stage writes progress every half second and a waiting one retries every
        few; silence for that long means the message that should carry the layer on was
        lost (Redis can drop one when it restarts between a pop and its bookkeeping).
        Finished and expired jobs leave the active set here.
        """
        now, out = time.time(), []
        for raw in self.client.zrange(ACTIVE, 0, -1):
            job_id = raw.decode()
            key = self._key(job_id)
            if not self.client.exists(key):
                self.client.zrem(ACTIVE, job_id)
                continue
            if self.client.hget(key, "planned") != b"1":
                continue
            layers = self.layers(job_id)
            if all(x.get("state") in FINISHED for x in layers):
                self.client.zrem(ACTIVE, job_id)
                continue
            out += [(job_id, x, layers) for x in layers if x.get("state") not in FINISHED
                    and now - float(x.get("updated", 0)) > older_than]
        return out

    def cancel(self, job_id: str) -> int | None:
        """Mark the job cancelled and its layers not yet started cancelled; None if unknown.

        Returns how many layers it stopped. The flag also stops the job's plan and layer
        tasks still in the queues when a worker takes them (`cancelled`); a layer whose
        chain has begun finishes: stopping it mid-way would leave its staging file behind.
        """
        key = self._key(job_id)
        if not self.client.exists(key):
            return None
        self.client.hset(key, "cancelled", "1")
        stopped = 0
        for x in self.layers(job_id):
            if x.get("state", "pending") == "pending":
                self.update_layer(job_id, x["digest"], x["target"], state="cancelled")
                stopped += 1
        return stopped

    def cancelled(self, job_id: str, max_age: float = 0) -> bool:
        """Whether the job was cancelled. `max_age`: a "no" this store read less than
        that many seconds ago is trusted (a "yes" is final, so it is kept)."""
        now = time.monotonic()
        with self._cancel_lock:
            seen = self._cancel_reads.get(job_id)
        if seen is not None and (seen[1] or now - seen[0] < max_age):
            return seen[1]
        flag = self.client.hget(self._key(job_id), "cancelled") == b"1"
        with self._cancel_lock:
            self._cancel_reads[job_id] = (now, flag)
            if len(self._cancel_reads) > _CANCEL_READS_KEPT:  # the oldest job first
                del self._cancel_reads[next(iter(self._cancel_reads))]
        return flag

    def recent(self, limit: int) -> list[dict[str, Any]]:
        """The newest `limit` jobs still on record, newest first, each as `status` reads it.

        Ids of expired jobs leave the index here, so it grows no longer than the TTL allows.
        """
        self.client.zremrangebyscore(RECENT, "-inf", time.time() - self.ttl)
        out: list[dict[str, Any]] = []
        for raw in self.client.zrevrange(RECENT, 0, -1):
            if len(out) == limit:
                break
            status = self.status(raw.decode())
            if status is None:
                self.client.zrem(RECENT, raw)
            else:
                out.append(status)
        return out

    def status(self, job_id: str) -> dict[str, Any] | None:
        key = self._key(job_id)
        meta = {k.decode(): v.decode() for k, v in self.client.hgetall(key).items()}
        if not meta:
            return None
        layers = sorted(self.layers(job_id), key=lambda x: x.get("order", 0))
        failures = json.loads(meta.get("image_failures", "[]"))
        return {
            "id": job_id,
            "state": "cancelled" if meta.get("cancelled") == "1"
                     else _job_state(meta.get("planned") == "1", layers, failures),
            "target": meta["target"],
            "refs": json.loads(meta["refs"]),
            "platform": meta.get("platform") or None,
            "created": float(meta["created"]),
            "layers": [_public_layer(x) for x in layers],
            "totals": _totals(layers, float(meta["created"])),
            "image_failures": failures,
        }


def _as_shown(raw: bytes, progress: bytes | None) -> dict[str, Any]:
    """A layer's record, with its progress laid over it if newer and not finished."""
    record = json.loads(raw)
    if progress and record.get("state") not in FINISHED:
        live = json.loads(progress)
        if float(live.get("updated", 0)) > float(record.get("updated", 0)):
            record.update(live)
    return record


def _shown(fields: dict[bytes, bytes]) -> list[dict[str, Any]]:
    """Every layer of a job's layers hash, as `_as_shown`."""
    suffix = _PROGRESS.encode()
    return [_as_shown(raw, fields.get(name + suffix)) for name, raw in fields.items()
            if not name.endswith(suffix)]


def _job_state(planned: bool, layers: list[dict], failures: list) -> str:
    if not planned:
        return "planning"
    if any(x.get("state") not in FINISHED for x in layers):
        return "running"
    return "failed" if failures or any(x["state"] == "failed" for x in layers) else "done"


def _public_layer(x: dict[str, Any]) -> dict[str, Any]:
    return {
        "digest": x["digest"],
        "target": x["target"],
        "state": x.get("state", "pending"),
        "bytes_done": int(x.get("bytes_done", 0)),
        "bytes_total": int(x.get("bytes_total", x.get("size", 0))),
        "size": int(x.get("size", 0)),
        "tier": x.get("tier"),
        "host": x.get("host"),
        "reason": x.get("reason"),
        "publish": x.get("publish"),  # None (no remote tier), "pending" or "done"
        "shared_from": x.get("shared_from"),  # tier "link": the digest whose file it shares
    }


def _totals(layers: list[dict[str, Any]], created: float) -> dict[str, Any]:
    """Progress in compressed bytes: a finished layer counts whole, a fetch counts so far."""
    total = sum(int(x.get("size", 0)) for x in layers)
    done = 0
    for x in layers:
        if x.get("state") in FINISHED:
            done += int(x.get("size", 0))
        elif x.get("state") == "fetching":
            done += min(int(x.get("bytes_done", 0)), int(x.get("size", 0)))
    elapsed = max(time.time() - created, 1e-3)
    eta = elapsed * (total - done) / done if 0 < done < total else (0.0 if total == done else None)
    return {
        "layers": len(layers),
        "done": sum(1 for x in layers if x.get("state") == "done"),
        "failed": sum(1 for x in layers if x.get("state") == "failed"),
        "pending": sum(1 for x in layers if x.get("state") not in FINISHED),
        "bytes_done": done,
        "bytes_total": total,
        "eta_seconds": None if eta is None else round(eta, 1),
    }
