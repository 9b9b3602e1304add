"""The sweeper: a layer whose chain was lost gets its fetch sent again, once.

Real Redis: the job records, queues, node claims and `unacked` hash are the ones the
workers use (tests/faults/test_lost_chains.py runs the same through a real fleet).
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Iterator

import pytest
import redis

from workers.app import app
from workers.jobs import ACTIVE, JobStore
from workers.routing import FLEET_QUEUE, node_cpu_queue, node_io_queue
from workers.sweeper import UNACKED, sweep_once

LAYER = {
    "digest": "sha256:" + "a" * 64, "diff_id": "sha256:" + "b" * 64,
    "media_type": "application/vnd.oci.image.layer.v1.tar+gzip", "size": 10,
    "sources": ["127.0.0.1:5000/t/x"],
}


def _fetches_for(client: redis.Redis, job_id: str, queue: str = FLEET_QUEUE) -> list[bytes]:
    return [m for m in client.lrange(queue, 0, -1) if job_id.encode() in m]


Books = tuple[JobStore, redis.Redis]


@pytest.fixture
def books() -> Iterator[Books]:
    """The workers' broker database (the one `app.send_task` sends to), with no message
    in the queues these tests look at, and everything they add removed after."""
    client = redis.Redis.from_url(app.conf.broker_url)
    queues = [FLEET_QUEUE, node_io_queue("gone"), node_cpu_queue("gone"),
              node_io_queue("busy"), node_cpu_queue("busy")]
    assert not any(client.llen(q) for q in queues), "messages left in the test broker"
    assert not client.hlen(UNACKED), "unacknowledged messages in the test broker"
    yield JobStore(client, ttl=600), client
    client.delete(*queues, UNACKED, "layerwarm:node:gone", "layerwarm:node:busy")
    for key in client.scan_iter("layerwarm:requeue:*"):
        client.delete(key)


def _job(jobs: JobStore, target: str = "remote") -> str:
    job_id = uuid.uuid4().hex
    jobs.create(job_id, ["127.0.0.1:5000/t/x:1"], target, None)
    jobs.planned(job_id, [{**LAYER, "target": target, "order": 0}], [])
    return job_id


def _silence(client: redis.Redis, job_id: str, target: str = "remote", **fields: object) -> None:
    """Make the layer's record say `fields`, last written a minute ago."""
    key, field = f"layerwarm:job:{job_id}:layers", f"{LAYER['digest']}|{target}"
    rec = json.loads(client.hget(key, field))
    client.hset(key, field, json.dumps({**rec, **fields, "updated": time.time() - 60}))


def _record(client: redis.Redis, job_id: str, target: str = "remote") -> dict:
    return json.loads(client.hget(f"layerwarm:job:{job_id}:layers", f"{LAYER['digest']}|{target}"))


def _forget(client: redis.Redis, job_id: str) -> None:
    client.zrem(ACTIVE, job_id)
    client.delete(f"layerwarm:job:{job_id}", f"layerwarm:job:{job_id}:layers")


def test_a_layer_nothing_carries_is_fetched_again_once_with_its_lease(books: Books) -> None:
    jobs, client = books
    job_id = _job(jobs)
    try:
        assert sweep_once(jobs, after=30) == 0, "a freshly planned layer is not stalled"
        _silence(client, job_id, state="decompressing", lease="a-token")
        assert sweep_once(jobs, after=30) == 1
        queued = _fetches_for(client, job_id)
        assert len(queued) == 1 and b"layerwarm.fetch" in queued[0]
        assert b"a-token" in queued[0], "the new fetch carries the lost chain's lease"
        rec = _record(client, job_id)
        assert (rec["state"], rec["requeued"]) == ("pending", 1)
        assert sweep_once(jobs, after=30) == 0, "sent once, not on every sweep"

        jobs.update_layer(job_id, LAYER["digest"], "remote", state="done")
        sweep_once(jobs, after=30)
        assert client.zscore(ACTIVE, job_id) is None, "a finished job leaves the active set"
    finally:
        _forget(client, job_id)


def test_a_layer_whose_message_waits_in_a_queue_or_with_a_worker_is_let_be(books: Books) -> None:
    jobs, client = books
    job_id = _job(jobs)
    try:
        # Its host is live, under the run that wrote the record: only the queues tell.
        client.set("layerwarm:node:busy", json.dumps({"host": "h", "pid": 1, "run": "r1"}))
        _silence(client, job_id, state="fetching", host="busy", run="r1")
        client.rpush(node_cpu_queue("busy"), b"another layer's decompress")
        assert sweep_once(jobs, after=30) == 0, "its decompress may wait behind that one"
        client.delete(node_cpu_queue("busy"))
        # A worker took its message (a prefetched decompress) and has not acknowledged it.
        client.hset(UNACKED, "tag-1", json.dumps(
            [{"headers": {"argsrepr": f"('{job_id}', {{'digest': '{LAYER['digest']}'}})"}},
             "", node_cpu_queue("busy")]))
        assert sweep_once(jobs, after=30) == 0, "a worker holds its next step"
        client.delete(UNACKED)
        assert sweep_once(jobs, after=30) == 1, "nothing holds it any more"
    finally:
        _forget(client, job_id)


def test_a_layer_whose_worker_is_gone_or_restarted_is_fetched_again(books: Books) -> None:
    jobs, client = books
    job_id = _job(jobs)
    try:
        # A message waits in the fleet queue, but the worker that had this layer is gone.
        client.rpush(FLEET_QUEUE, b"another job's fetch")
        _silence(client, job_id, state="decompressing", host="gone", run="r1")
        assert sweep_once(jobs, after=30) == 1, "node gone: its unacknowledged message waits hours"
        assert _record(client, job_id)["host"] is None
        client.delete(*(f"layerwarm:requeue:{job_id}:{LAYER['digest']}|remote",))
        client.set("layerwarm:node:gone", json.dumps({"host": "h", "pid": 1, "run": "r2"}))
        _silence(client, job_id, state="decompressing", host="gone", run="r1")
        assert sweep_once(jobs, after=30) == 1, "restarted: the old run's message is lost"
        assert len(_fetches_for(client, job_id)) == 2
    finally:
        _forget(client, job_id)


def test_a_node_targets_layer_waits_for_its_node_in_that_nodes_queue(books: Books) -> None:
    jobs, client = books
    target = "node:gone"
    job_id = _job(jobs, target)
    try:
        _silence(client, job_id, target, state="fetching", host="gone", run="r1")
        assert sweep_once(jobs, after=30) == 1
        assert len(_fetches_for(client, job_id, node_io_queue("gone"))) == 1
        rec = _record(client, job_id, target)
        assert (rec["state"], rec["waiting"]) == ("pending", "node gone (not running)")
        client.delete(f"layerwarm:requeue:{job_id}:{LAYER['digest']}|{target}")
        _silence(client, job_id, target)
        assert sweep_once(jobs, after=30) == 0, "its fetch waits in the node's queue"
    finally:
        _forget(client, job_id)


def test_a_follower_waits_for_the_target_it_follows_and_goes_with_it(books: Books) -> None:
    """all-nodes with a shared tier: node:gone's fetch of the layer is sent when node:busy's
    chain ends (workers/tasks.py `_owners`). Silent, it is not lost while node:busy is at
    it; if node:busy's chain is lost, its fetch goes again carrying node:gone's; if
    node:busy stops running, node:gone fetches the layer itself."""
    jobs, client = books
    job_id = uuid.uuid4().hex
    jobs.create(job_id, ["127.0.0.1:5000/t/x:1"], "all-nodes", None)
    jobs.planned(job_id, [{**LAYER, "target": "node:busy", "order": 0},
                          {**LAYER, "target": "node:gone", "order": 1, "after": "node:busy"}],
                 [])
    try:
        client.set("layerwarm:node:busy", json.dumps({"host": "h", "pid": 1, "run": "r1"}))
        _silence(client, job_id, "node:gone")
        assert sweep_once(jobs, after=30) == 0, "the target it follows is at it"

        _silence(client, job_id, "node:busy", state="fetching", host="busy", run="r0")
        assert sweep_once(jobs, after=30) == 1, "node busy restarted: its chain is lost"
        (sent,) = _fetches_for(client, job_id, node_io_queue("busy"))
        body = json.loads(base64.b64decode(json.loads(sent)["body"]))
        assert body[1] == {"token": None, "then": ["node:gone"]}, body
        assert not _fetches_for(client, job_id, node_io_queue("gone"))

        client.delete("layerwarm:node:busy")
        assert sweep_once(jobs, after=30) == 1, "node busy is not running: gone fetches it"
        (sent,) = _fetches_for(client, job_id, node_io_queue("gone"))
        assert json.loads(base64.b64decode(json.loads(sent)["body"]))[1] == {"token": None}
        rec = _record(client, job_id, "node:gone")
        assert (rec["requeued"], rec["after"]) == (1, None), "it follows nobody now"
        client.delete(f"layerwarm:requeue:{job_id}:{LAYER['digest']}|node:gone")
        _silence(client, job_id, "node:gone")
        assert sweep_once(jobs, after=30) == 0, "its own fetch waits in its node's queue"
    finally:
        _forget(client, job_id)


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
