"""Job records (workers/jobs.py) against real Redis: what `submit --wait` relies on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import redis

from workers.app import app
from workers.jobs import ACTIVE, JobStore

REPO_ROOT = Path(__file__).resolve().parents[1]
LAYER = {
    "digest": "sha256:" + "c" * 64, "diff_id": "sha256:" + "d" * 64,
    "media_type": "application/vnd.oci.image.layer.v1.tar+gzip", "size": 10,
    "sources": ["127.0.0.1:5000/t/y"],
}


def _job(client: redis.Redis) -> tuple[JobStore, str]:
    jobs = JobStore(client, ttl=600)
    job_id = uuid.uuid4().hex
    jobs.create(job_id, ["127.0.0.1:5000/t/y:1"], "remote", None)
    return jobs, job_id


def _next_message(events: redis.client.PubSub, timeout: float) -> bytes | None:
    """The next published message; get_message returns None once for the subscription's
    own confirmation, which ignore_subscribe_messages swallows."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        message = events.get_message(timeout=left)
        if message is not None:
            return message["data"]
    return None


def _cleanup(client: redis.Redis, job_id: str) -> None:
    client.zrem(ACTIVE, job_id)
    client.delete(f"layerwarm:job:{job_id}", f"layerwarm:job:{job_id}:layers")


def test_a_finishing_layer_is_announced_on_the_jobs_channel(redis_url: str) -> None:
    client = redis.Redis.from_url(app.conf.broker_url)
    jobs, job_id = _job(client)
    events = client.pubsub(ignore_subscribe_messages=True)
    events.subscribe(jobs.events_channel(job_id))
    try:
        jobs.planned(job_id, [{**LAYER, "target": "remote", "order": 0}], [])
        assert _next_message(events, 5) == b"planned"
        jobs.update_layer(job_id, LAYER["digest"], "remote", state="fetching", bytes_done=5)
        assert _next_message(events, 0.5) is None, "progress is not announced"
        jobs.update_layer(job_id, LAYER["digest"], "remote", state="done")
        assert _next_message(events, 5) == f"{LAYER['digest']}|remote".encode()
        jobs.update_layer(job_id, LAYER["digest"], "remote", state="done", publish="done")
        assert _next_message(events, 0.5) is None, "a finished layer is announced once"
    finally:
        events.close()
        _cleanup(client, job_id)


def test_status_watch_ends_with_the_job(redis_url: str) -> None:
    client = redis.Redis.from_url(app.conf.broker_url)
    jobs, job_id = _job(client)
    jobs.planned(job_id, [{**LAYER, "target": "remote", "order": 0}], [])
    watch = subprocess.Popen(
        [sys.executable, "-m", "workers.cli", "status", "--watch", "--json", job_id],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT,
        env={**os.environ, "LAYERWARM_BROKER_URL": app.conf.broker_url})
    try:
        jobs.update_layer(job_id, LAYER["digest"], "remote", state="failed", reason="test")
        out, err = watch.communicate(timeout=60)
        assert watch.returncode == 1, err  # like `warm`: a failed layer fails the command
        status = json.loads(out)
        assert status["state"] == "failed" and status["layers"][0]["reason"] == "test"
    finally:
        watch.kill()
        _cleanup(client, job_id)


def test_a_layer_record_always_expires_even_written_after_the_job_expired(
        redis_url: str) -> None:
    """A state change keeps the TTL the plan set; a write that finds the record gone (a
    late task of an expired job) makes it again with the TTL, never without one."""
    client = redis.Redis.from_url(app.conf.broker_url)
    jobs, job_id = _job(client)
    key = f"layerwarm:job:{job_id}:layers"
    try:
        jobs.planned(job_id, [{**LAYER, "target": "remote", "order": 0}], [])
        client.expire(key, 100)  # as if the plan was recorded a while ago
        jobs.update_layer(job_id, LAYER["digest"], "remote", state="fetching", bytes_done=5)
        assert 0 < client.ttl(key) <= 100, "a state change keeps the plan's TTL"
        assert json.loads(client.hget(key, f"{LAYER['digest']}|remote"))["state"] == "fetching"
        client.delete(key)  # the job's records expired meanwhile
        jobs.update_layer(job_id, LAYER["digest"], "remote", state="done")
        assert 100 < client.ttl(key) <= 600, "a record made again gets the job TTL"
    finally:
        _cleanup(client, job_id)


def test_progress_shows_while_running_and_never_reopens_a_finished_layer(
        redis_url: str) -> None:
    """Progress is written without reading the record (one command); readers show it over
    the record while the layer runs, and a late progress write after the end shows nothing."""
    client = redis.Redis.from_url(app.conf.broker_url)
    jobs, job_id = _job(client)
    digest = LAYER["digest"]
    try:
        jobs.planned(job_id, [{**LAYER, "target": "remote", "order": 0}], [])
        jobs.progress_layer(job_id, digest, "remote", state="pending", waiting="b:1")
        assert jobs.layers(job_id)[0]["waiting"] == "b:1"
        jobs.progress_layer(job_id, digest, "remote", state="fetching", bytes_done=4, host="a")
        (shown,) = jobs.layers(job_id)
        assert (shown["state"], shown["bytes_done"], shown["host"]) == ("fetching", 4, "a")
        assert "waiting" not in shown, "progress is written whole: the wait is over"
        assert jobs.layer_state(job_id, digest, "remote") == "fetching"
        assert jobs.status(job_id)["layers"][0]["state"] == "fetching"

        jobs.update_layer(job_id, digest, "remote", state="done", host="a", bytes_done=10)
        jobs.progress_layer(job_id, digest, "remote", state="publishing", bytes_done=1)
        (shown,) = jobs.layers(job_id)
        assert (shown["state"], shown["bytes_done"]) == ("done", 10), shown
        assert jobs.status(job_id)["state"] == "done"
        with pytest.raises(ValueError):
            jobs.progress_layer(job_id, digest, "remote", state="failed")
    finally:
        _cleanup(client, job_id)


def test_a_record_written_after_progress_is_shown_over_it(redis_url: str) -> None:
    """The sweeper's "pending" (a record write) wins over a stage's older progress."""
    client = redis.Redis.from_url(app.conf.broker_url)
    jobs, job_id = _job(client)
    digest = LAYER["digest"]
    try:
        jobs.planned(job_id, [{**LAYER, "target": "remote", "order": 0}], [])
        jobs.progress_layer(job_id, digest, "remote", state="fetching", host="gone", run="r1")
        jobs.update_layer(job_id, digest, "remote", state="pending", host=None, run=None,
                          requeued=1)
        (shown,) = jobs.layers(job_id)
        assert (shown["state"], shown["host"], shown["requeued"]) == ("pending", None, 1)
    finally:
        _cleanup(client, job_id)


def test_a_progress_write_to_an_expired_job_gets_the_job_ttl(redis_url: str) -> None:
    client = redis.Redis.from_url(app.conf.broker_url)
    jobs, job_id = _job(client)
    key = f"layerwarm:job:{job_id}:layers"
    try:
        jobs.planned(job_id, [{**LAYER, "target": "remote", "order": 0}], [])
        client.expire(key, 100)
        jobs.progress_layer(job_id, LAYER["digest"], "remote", state="fetching")
        assert 0 < client.ttl(key) <= 100, "progress keeps the plan's TTL"
        client.delete(key)
        jobs.progress_layer(job_id, LAYER["digest"], "remote", state="fetching")
        assert 100 < client.ttl(key) <= 600, "a hash made again gets the job TTL"
    finally:
        _cleanup(client, job_id)


def test_wait_reads_the_job_when_its_last_layer_finishes_not_at_each(
        redis_url: str, monkeypatch, capsys) -> None:  # noqa: ANN001
    """`--wait` ends as soon as the job does, without reading the job back once per
    finished layer: a fleet job's layers finish many a second."""
    import threading

    import workers.cli.jobs as cli

    client = redis.Redis.from_url(app.conf.broker_url)
    jobs, job_id = _job(client)
    digests = [f"sha256:{i:064x}" for i in range(30)]
    jobs.planned(job_id, [{**LAYER, "digest": d, "target": "remote", "order": i}
                          for i, d in enumerate(digests)], [])
    reads: list[float] = []
    first_read = threading.Event()

    class CountingStore(JobStore):
        def status(self, job_id: str):  # noqa: ANN202
            reads.append(time.monotonic())
            first_read.set()
            return super().status(job_id)

    monkeypatch.setattr(cli, "_store", lambda: CountingStore(client, ttl=600))
    monkeypatch.setattr(cli, "FOLLOW_REDRAW", 120.0)  # only the job's events wake it
    ended: list[int] = []
    follower = threading.Thread(target=lambda: ended.append(cli.follow(job_id, as_json=True)))
    try:
        follower.start()
        assert first_read.wait(30), "the follower never read the job"
        for d in digests[:-1]:
            jobs.update_layer(job_id, d, "remote", state="done")
            time.sleep(0.05)  # room for a follower that reads at each event to do so
        jobs.update_layer(job_id, digests[-1], "remote", state="done")
        follower.join(60)
        assert not follower.is_alive(), "--wait did not end with the job"
        assert ended == [0]
        assert len(reads) == 2, f"{len(reads)} reads of a job of 30 layers"
        assert json.loads(capsys.readouterr().out)["state"] == "done"
    finally:
        if follower.is_alive():
            jobs.update_layer(job_id, digests[-1], "remote", state="failed")
        _cleanup(client, job_id)


def test_a_task_message_is_pushed_without_declaring_its_queue(redis_url: str) -> None:
    """Sends skip Celery's queue declare (LLENs and a binding, per producer connection):
    the message still lands on the queue's list, where its worker pops it."""
    client = redis.Redis.from_url(app.conf.broker_url)
    queue = f"layerwarm.io.t{uuid.uuid4().hex[:10]}"
    try:
        app.send_task("layerwarm.fetch", ("job", LAYER, "remote"), queue=queue)
        assert client.llen(queue) == 1
        message = json.loads(client.lindex(queue, 0))
        assert message["headers"]["task"] == "layerwarm.fetch"
        assert message["properties"]["delivery_info"]["routing_key"] == queue
        bound = [m for key in client.scan_iter("_kombu.binding.*")
                 for m in client.smembers(key) if queue.encode() in m]
        assert bound == [], "the send declared and bound its queue"
    finally:
        client.delete(queue)


def test_a_cancel_flag_read_is_trusted_for_max_age_and_a_yes_for_good(redis_url: str) -> None:
    client = redis.Redis.from_url(app.conf.broker_url)
    jobs, job_id = _job(client)
    other = JobStore(client, ttl=600)  # `layerwarm cancel`, in another process
    try:
        jobs.planned(job_id, [{**LAYER, "target": "remote", "order": 0}], [])
        assert not jobs.cancelled(job_id, max_age=60)
        assert other.cancel(job_id) == 1
        assert not jobs.cancelled(job_id, max_age=60), "a 'no' read just now is trusted"
        assert jobs.cancelled(job_id), "max_age 0: asked again"
        client.hdel(f"layerwarm:job:{job_id}", "cancelled")
        assert jobs.cancelled(job_id), "cancelled is final: not asked again"
    finally:
        _cleanup(client, job_id)


def test_status_text_names_each_failed_layer_once_with_its_reason(redis_url: str) -> None:
    """What `status` prints for a failed layer: its reason as the task recorded it (which
    starts with the layer's name, as stage errors do) says the layer once; a record left
    without a reason still prints its line."""
    from workers.cli.jobs import status_text

    client = redis.Redis.from_url(app.conf.broker_url)
    jobs, job_id = _job(client)
    other = {**LAYER, "digest": "sha256:" + "e" * 64}
    try:
        jobs.planned(job_id, [{**LAYER, "target": "remote", "order": 0},
                              {**other, "target": "remote", "order": 1}], [])
        jobs.update_layer(job_id, LAYER["digest"], "remote", state="failed",
                          reason=f"layer {LAYER['digest']}: corrupt gzip data (bad CRC)")
        jobs.update_layer(job_id, other["digest"], "remote", state="failed")
        status = jobs.status(job_id)
        assert status is not None
        errors = [x for x in status_text(status).splitlines() if x.startswith("error:")]
    finally:
        _cleanup(client, job_id)
    assert errors == [
        f"error: layer {LAYER['digest']} (remote): corrupt gzip data (bad CRC)",
        f"error: layer {other['digest']} (remote): no reason recorded",
    ]
