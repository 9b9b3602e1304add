"""The Celery app: Redis as broker and result backend, configured so no work is lost.

acks_late + prefetch 1: a message is acknowledged only after its task finished, and a
worker holds one message per free slot. A worker killed mid-task leaves its message
unacknowledged; Redis hands it out again after `visibility_timeout`, which must be longer
than the longest task. Every task is idempotent by content address, so running one twice
finishes the job rather than corrupting it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from celery import Celery

from pipeline.units import parse_duration
from workers.redisconn import CONNECT_TIMEOUT, HEALTH_CHECK_INTERVAL, SOCKET_TIMEOUT
from workers.routing import FLEET_QUEUE

DEFAULT_BROKER = "redis://127.0.0.1:6379/0"


def _seconds(name: str, default: float) -> float:
    raw = os.environ.get(name)
    return float(raw) if raw else default


def broker_url() -> str:
    return os.environ.get("LAYERWARM_BROKER_URL") or DEFAULT_BROKER


VISIBILITY_TIMEOUT = _seconds("LAYERWARM_VISIBILITY_TIMEOUT", 3 * 3600)
JOB_TTL = _seconds("LAYERWARM_JOB_TTL", 7 * 86400)
# How long a worker host's claim on its node name outlives the host (workers/nodeclaim.py).
NODE_TTL = _seconds("LAYERWARM_NODE_TTL", 15)
# A layer whose record is silent this long, and whose worker is gone or whose next message
# is in no queue, is fetched again (workers/sweeper.py). Far below the visibility timeout:
# a killed worker's message would otherwise wait that long to come back.
REQUEUE_AFTER = parse_duration(os.environ.get("LAYERWARM_REQUEUE_AFTER") or "5m",
                               "LAYERWARM_REQUEUE_AFTER")
# How often `layerwarm beat` has every node run gc (a node without a quota does nothing).
GC_INTERVAL = parse_duration(os.environ.get("LAYERWARM_GC_INTERVAL") or "1h",
                             "LAYERWARM_GC_INTERVAL")

# kombu looks for expired unacknowledged messages every `interval` seconds but scans only
# every `throttle`-th time (by default 10 x 10 s). Scan at every check, a few times per
# visibility timeout, so a killed worker's task comes back soon after the timeout.
_TRANSPORT = {
    "visibility_timeout": VISIBILITY_TIMEOUT,
    "unacked_restore_interval": max(1, min(10, int(VISIBILITY_TIMEOUT / 4))),
    "unacked_restore_throttle": 1,
    # Bounded connects and reads, as for every Redis client (workers/redisconn.py): a
    # half-open broker connection fails and is re-made instead of hanging the consumer.
    # kombu's blocking BRPOP waits at most 1 s, well inside the socket timeout.
    "socket_connect_timeout": CONNECT_TIMEOUT,
    "socket_timeout": SOCKET_TIMEOUT,
    "socket_keepalive": True,
    "health_check_interval": HEALTH_CHECK_INTERVAL,
}


def _undeclared(*_route_args: object, **_route_kw: object) -> dict[str, object]:
    """Every task message goes out without declaring its queue (a task route, so every
    send takes it: apply_async, send_task, retries).

    Celery declares a message's queue at each send, once per producer connection: on
    Redis that is four LLENs in a MULTI/EXEC and an SADD, and a fleet's first job makes a
    pool's worth of connections in every worker (~5 of S1's commands per layer-target).
    Nothing needs it: Celery sends to a direct queue by the anonymous exchange, which
    kombu's Redis transport turns into an LPUSH onto the list of that name, whether or not
    a consumer ever declared it; each worker declares the queues it consumes."""
    return {"declare": []}


app = Celery("layerwarm", include=["workers.tasks", "workers.lifecycle"])
app.conf.update(
    broker_url=broker_url(),
    result_backend=broker_url(),
    broker_connection_retry_on_startup=True,
    broker_transport_options=_TRANSPORT,
    result_backend_transport_options={"visibility_timeout": VISIBILITY_TIMEOUT},
    # The result backend's own client (Celery's defaults: no connect timeout, 120 s reads).
    redis_socket_connect_timeout=CONNECT_TIMEOUT,
    redis_socket_timeout=SOCKET_TIMEOUT,
    redis_socket_keepalive=True,
    redis_backend_health_check_interval=HEALTH_CHECK_INTERVAL,
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    task_default_queue=FLEET_QUEUE,
    task_routes=(_undeclared,),
    task_track_started=True,
    task_send_sent_event=True,
    worker_send_task_events=True,
    result_expires=int(JOB_TTL),
    result_extended=True,  # Flower shows task names and args from the result backend
)

# Read by `layerwarm beat` (celery beat) only; workers ignore it. Run one beat per fleet.
app.conf.beat_schedule = {
    "layerwarm-gc-all-nodes": {
        "task": "layerwarm.gc_all_nodes",
        "schedule": GC_INTERVAL,
        "options": {"queue": FLEET_QUEUE, "expires": GC_INTERVAL},
    },
}


def enqueue_job(job_id: str, refs: Sequence[str], targets: Sequence[str],
                platform: str | None) -> None:
    """Start a job: planning runs on any worker, which then fans out the layer tasks.

    Sent by name, so `submit` does not import the tasks and the pipeline they run
    (a third of a second of its start-up).
    """
    app.send_task("layerwarm.plan", (job_id, list(refs), list(targets), platform),
                  task_id=f"{job_id}-plan")
