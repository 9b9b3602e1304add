"""Carry on layers whose chain was lost: fetch them again within minutes, not hours.

A layer's chain is a message at each step, and a message can be lost with the worker
holding it (killed, crashed, its host restarted or gone: Redis hands the message out
again only after the visibility timeout, three hours by default) or in Redis itself (a
restart between a pop and its bookkeeping). Each IO worker runs this sweeper. A layer of
an active job whose record has been silent for LAYERWARM_REQUEUE_AFTER (5 minutes by
default) is lost when

- the worker that last wrote its record is gone: its node holds no claim, or a claim of
  another run (workers/nodeclaim.py); or
- no message could be carrying it on: none of the queues its next step is sent to holds
  a message, and no worker holds one of its job for it (Redis keeps the messages a worker
  took, and has not acknowledged, in the transport's `unacked` hash).

Its fetch is then sent again, with the layer's lease token, so the new fetch carries on
the lost one's lease instead of waiting for it to lapse, and with the targets that follow
it (an all-nodes job's other nodes, whose fetches its chain sends when it ends). A
follower is not lost while the target it follows is still at it: it is if that target's
node is not running, and then fetches the layer itself. A layer for a node that is not
running waits in that node's queue, shown as such, like every other message sent to it.
Every stage is idempotent by content address, so a spare fetch costs time, never
correctness; a Redis key per layer makes one worker, not all of them, send it.

It sends the fetch by task name: workers.tasks starts the sweeper, and importing the
tasks from here would make the two modules import each other.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import redis

from workers.app import app
from workers.jobs import FINISHED, JobStore
from workers.nodeclaim import current_run
from workers.routing import FOLLOWERS, Target, node_cpu_queue, node_io_queue

log = logging.getLogger("layerwarm")
LAYER_FIELDS = ("digest", "diff_id", "media_type", "size", "sources")
# Where kombu's Redis transport keeps the messages workers took and have not acknowledged
# (its `unacked_key` transport option, left at its default in workers/app.py).
UNACKED = "unacked"


class _Round:
    """What one sweep reads from Redis, each thing once and only when a layer needs it."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._runs: dict[str, str | None] = {}
        self._unacked: list[bytes] | None = None

    def run_of(self, node: str) -> str | None:
        if node not in self._runs:
            self._runs[node] = current_run(self.client, node)
        return self._runs[node]

    def held(self, job_id: str, digest: str) -> bool:
        """A worker holds a message of this job for this layer (a tiny layers' batch
        message counts for each of its layers: its arguments are shown cut short)."""
        if self._unacked is None:
            self._unacked = list(self.client.hvals(UNACKED))
        job, layer = job_id.encode(), digest.encode()
        return any(job in m and (layer in m or b"fetch_batch" in m) for m in self._unacked)


def _others(layers: list[dict[str, Any]], rec: dict[str, Any]) -> list[dict[str, Any]]:
    """Of a job's layer records, those of the other targets for `rec`'s layer."""
    return [x for x in layers if x["digest"] == rec["digest"] and x["target"] != rec["target"]]


def why_lost(sweep: _Round, job_id: str, rec: dict[str, Any],
             layers: list[dict[str, Any]]) -> str | None:
    """Why this silent layer's chain is lost, or None while something may carry it on;
    `layers`: every layer record of its job."""
    host, run = rec.get("host"), rec.get("run")
    if rec.get("after") and not host:  # waits for another target's chain to send its fetch
        first = next((x for x in _others(layers, rec) if x["target"] == rec["after"]), None)
        if first is not None and first.get("state") not in FINISHED:
            node = Target.parse(rec["after"]).node
            if node is not None and sweep.run_of(node) is None:
                return f"node {node}, which was to fetch it first, is not running"
            return None  # if that chain is lost, its own sweep sends it again, with this
    if host and run:
        now = sweep.run_of(host)
        if now is None:
            return f"node {host}, which had it, is not running"
        if now != run:
            return f"node {host} was restarted while it had it"
    queues = {Target.parse(rec["target"]).fetch_queue}
    if host:
        queues |= {node_io_queue(host), node_cpu_queue(host)}
    if any(sweep.client.llen(q) for q in queues) or sweep.held(job_id, rec["digest"]):
        return None  # its next message may be waiting behind others
    return "no queue or worker holds its next step"


def sweep_once(jobs: JobStore, after: float) -> int:
    """Send the fetch of every lost layer silent for `after` seconds again; return how
    many. Each is sent once per `after`: the claim key, then its fresh record, say so."""
    count = 0
    sweep = _Round(jobs.client)
    for job_id, rec, layers in jobs.stalled(after):
        why = why_lost(sweep, job_id, rec, layers)
        if why is None:
            continue
        claim = f"layerwarm:requeue:{job_id}:{rec['digest']}|{rec['target']}"
        if not jobs.client.set(claim, "1", nx=True, ex=max(1, int(after))):
            continue  # another worker's sweeper has it
        target = Target.parse(rec["target"])
        waiting = None
        if target.node is not None and sweep.run_of(target.node) is None:
            waiting = f"node {target.node} (not running)"
        # A follower sent here has its own fetch now: it follows nobody any more.
        jobs.update_layer(job_id, rec["digest"], rec["target"], state="pending",
                          host=None, run=None, waiting=waiting, after=None,
                          requeued=int(rec.get("requeued", 0)) + 1)
        layer = {k: rec[k] for k in LAYER_FIELDS}
        then = [x["target"] for x in _others(layers, rec)
                if x.get("after") == rec["target"] and x.get("state") not in FINISHED]
        app.send_task("layerwarm.fetch", (job_id, layer, rec["target"]),
                      {"token": rec.get("lease"), **({FOLLOWERS: then} if then else {})},
                      queue=target.fetch_queue)
        log.warning("layer %s of job %s, %s for %.0fs: %s; fetch sent again%s",
                    rec["digest"], job_id, rec.get("state"), after, why,
                    f", waiting for {waiting}" if waiting else "")
        count += 1
    return count


def start_sweeper(jobs: JobStore, after: float) -> threading.Thread:
    def loop() -> None:
        while True:
            threading.Event().wait(max(2.0, after / 4))
            try:
                sweep_once(jobs, after)
            except (redis.RedisError, OSError) as e:  # Redis away: next round
                log.warning("sweeper: %s", e)
            except Exception:  # never let the sweeper die quietly
                log.exception("sweeper failed; trying again next round")

    thread = threading.Thread(target=loop, name="layerwarm-sweeper", daemon=True)
    thread.start()
    return thread
