"""Carry on layers whose next message was lost.

Redis hands a message to a worker with a pop and records it as unacknowledged with a
second command; a Redis restart between the two loses the message, and with it the rest
of that layer's chain. Each IO worker runs this sweeper: a layer of an active job whose
record has not changed for twice the visibility timeout (by then even a killed worker's
message would have come back) gets its fetch enqueued again. Every stage is idempotent
by content address, so a spare fetch costs time, never correctness; a Redis key per
layer makes one worker, not all of them, re-enqueue it.

It sends the fetch by task name: workers.tasks starts the sweeper, and importing the
tasks from here would make the two modules import each other.
"""

from __future__ import annotations

import logging
import threading

import redis

from workers.app import app
from workers.jobs import JobStore
from workers.routing import Target

log = logging.getLogger("layerwarm")
LAYER_FIELDS = ("digest", "diff_id", "media_type", "size", "sources")


def sweep_once(jobs: JobStore, stall: float) -> int:
    """Re-enqueue the fetch of every stalled layer once; return how many."""
    count = 0
    for job_id, rec in jobs.stalled(stall):
        claim = f"layerwarm:requeue:{job_id}:{rec['digest']}|{rec['target']}"
        if not jobs.client.set(claim, "1", nx=True, ex=max(1, int(stall))):
            continue  # another worker's sweeper has it
        layer = {k: rec[k] for k in LAYER_FIELDS}
        jobs.update_layer(job_id, rec["digest"], rec["target"],
                          requeued=int(rec.get("requeued", 0)) + 1)
        app.send_task("layerwarm.fetch", (job_id, layer, rec["target"]),
                      queue=Target.parse(rec["target"]).fetch_queue)
        log.warning("layer %s of job %s was silent for %.0fs in %s: fetch enqueued again",
                    rec["digest"], job_id, stall, rec.get("state"))
        count += 1
    return count


def start_sweeper(jobs: JobStore, stall: float) -> threading.Thread:
    def loop() -> None:
        while True:
            threading.Event().wait(max(2.0, stall / 4))
            try:
                sweep_once(jobs, stall)
            except (redis.RedisError, OSError) as e:  # Redis away: next round
                log.warning("sweeper: %s", e)
            except Exception:  # never let the sweeper die quietly
                log.exception("sweeper failed; trying again next round")

    thread = threading.Thread(target=loop, name="layerwarm-sweeper", daemon=True)
    thread.start()
    return thread
