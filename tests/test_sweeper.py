"""The sweeper: a layer whose next message was lost gets its fetch enqueued again, once.

Real Redis: the job record and the broker queue are the ones the workers use.
"""

from __future__ import annotations

import json
import time
import uuid

import redis

from workers.app import app
from workers.jobs import ACTIVE, JobStore
from workers.routing import FLEET_QUEUE
from workers.sweeper import sweep_once

LAYER = {
    "digest": "sha256:" + "a" * 64, "diff_id": "sha256:" + "b" * 64,
    "media_type": "application/vnd.oci.image.layer.v1.tar+gzip", "size": 10,
    "sources": ["127.0.0.1:5000/t/x"],
}


def _fetches_for(client: redis.Redis, job_id: str) -> list[bytes]:
    return [m for m in client.lrange(FLEET_QUEUE, 0, -1) if job_id.encode() in m]


def test_stalled_layer_is_enqueued_again_once(redis_url: str) -> None:
    client = redis.Redis.from_url(app.conf.broker_url)
    jobs = JobStore(client, ttl=600)
    job_id = uuid.uuid4().hex
    jobs.create(job_id, ["127.0.0.1:5000/t/x:1"], "remote", None)
    jobs.planned(job_id, [{**LAYER, "target": "remote", "order": 0}], [])
    try:
        assert sweep_once(jobs, stall=30) == 0, "a freshly planned layer is not stalled"
        # Nobody touched the record for a minute: its message is presumed lost.
        key = f"layerwarm:job:{job_id}:layers"
        field = f"{LAYER['digest']}|remote"
        rec = json.loads(client.hget(key, field))
        client.hset(key, field, json.dumps({**rec, "state": "decompressing",
                                            "updated": time.time() - 60}))
        assert sweep_once(jobs, stall=30) == 1
        queued = _fetches_for(client, job_id)
        assert len(queued) == 1 and b"layerwarm.fetch" in queued[0]
        assert json.loads(client.hget(key, field))["requeued"] == 1
        assert sweep_once(jobs, stall=30) == 0, "re-enqueued once, not on every sweep"

        jobs.update_layer(job_id, LAYER["digest"], "remote", state="done")
        sweep_once(jobs, stall=30)
        assert client.zscore(ACTIVE, job_id) is None, "a finished job leaves the active set"
    finally:
        for m in _fetches_for(client, job_id):
            client.lrem(FLEET_QUEUE, 0, m)
        client.zrem(ACTIVE, job_id)
        client.delete(f"layerwarm:job:{job_id}", f"layerwarm:job:{job_id}:layers")



def test_the_sweeper_does_not_import_the_tasks() -> None:
    """It enqueues by task name: workers.tasks imports the sweeper, not the other way
    (not even inside a function, where the cycle used to hide)."""
    import ast
    from pathlib import Path

    import workers.sweeper

    tree = ast.parse(Path(workers.sweeper.__file__).read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module or "" for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom)}
    assert "workers" in {name.split(".")[0] for name in imported}, "the walk sees imports"
    assert "workers.tasks" not in imported
