"""What every layer task shares: the worker's context, a layer's JSON form, its bookkeeping.

`bookkeeping()` needs only Redis, so a task can record a failure however it failed (a
worker whose Docker config or remote tier cannot be loaded fails its layers with the
reason); `context()` adds the settings, the registry client and the tiers, built once per
worker process. `LayerTask` records a layer's outcome in its job.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis
from celery import Task

from pipeline import stats
from pipeline.chain import Chain, Goal
from pipeline.config import Settings
from pipeline.digest import Digest
from pipeline.errors import LayerwarmError, layer_reason
from pipeline.layer import LayerResult, LayerSpec, Progress, Source
from pipeline.reference import Reference
from pipeline.runner import Environment, describe_error
from workers.app import JOB_TTL, VISIBILITY_TIMEOUT, app, broker_url
from workers.jobs import JobStore
from workers.leases import Leases
from workers.ratelimit import RedisRateLimiter
from workers.redisconn import connect
from workers.routing import FOLLOWERS, Target, check_node

log = logging.getLogger("layerwarm")
# How long a task trusts its process's last reading of a job's cancel flag: a fleet job's
# fetches start many a second, and each asked Redis (1.4 of S1's commands per
# layer-target). A cancel reaches a fetch that starts at most this late; one that started
# just before the cancel was never stopped either.
CANCEL_RECHECK = 1.0


class LeaseBusy(LayerwarmError):
    """Another worker of the fleet holds the layer's lease: it is fetching it."""

    def __init__(self, holder: str | None) -> None:
        super().__init__(f"another worker ({holder or 'unknown'}) is fetching this layer")
        self.holder = holder


@dataclass
class Bookkeeping:
    """What a task needs to record an outcome: Redis only, so it works when nothing else
    does (a worker whose Docker config or remote tier cannot be loaded still fails its
    layers with the reason, instead of leaving the job pending)."""

    node: str
    run: str  # this start of the host (workers/nodeclaim.py); "" outside `layerwarm worker`
    jobs: JobStore
    leases: Leases


@dataclass
class WorkerContext:
    node: str
    run: str
    env: Environment
    settings: Settings
    jobs: JobStore
    leases: Leases

    def chain(self, registry: Callable[[LayerSpec, Progress], int | None]) -> Chain:
        return self.env.chain(registry)


@functools.cache
def bookkeeping() -> Bookkeeping:
    node = check_node(os.environ.get("LAYERWARM_NODE") or socket.gethostname())
    client = connect(broker_url())
    lease_ttl = float(os.environ.get("LAYERWARM_LEASE_TTL") or 120)
    # A lease older than this is no longer renewed: its layer's chain was lost before its
    # record showed the token (the sweeper's new fetch carries the token it finds there).
    leases = Leases(client, lease_ttl, node, max_hold=2 * VISIBILITY_TIMEOUT)
    run = os.environ.get("LAYERWARM_NODE_RUN", "")
    return Bookkeeping(node, run, JobStore(client, JOB_TTL), leases)


@functools.cache
def context() -> WorkerContext:
    """Per worker process: settings, registry client, tiers, Redis, built once."""
    books = bookkeeping()
    settings = Settings.from_env()
    client = books.jobs.client
    limiter = RedisRateLimiter(client, settings.registry_rate) if settings.registry_rate else None
    return WorkerContext(
        node=books.node,
        run=books.run,
        env=Environment.from_settings(settings, limiter),
        settings=settings,
        jobs=books.jobs,
        leases=books.leases,
    )


def layer_to_json(layer: LayerSpec) -> dict[str, Any]:
    return {
        "digest": str(layer.digest),
        "diff_id": str(layer.diff_id),
        "media_type": layer.media_type,
        "size": layer.size,
        "sources": [str(s) for s in layer.sources],
    }


def layer_from_json(data: dict[str, Any]) -> LayerSpec:
    return LayerSpec(
        Digest.parse(data["digest"]),
        Digest.parse(data["diff_id"]),
        str(data["media_type"]),
        int(data["size"]),
        tuple(Reference.parse(s) for s in data["sources"]),
    )


def goal_of(target: str) -> Goal:
    """A node target wants the layer on that node's disk; the fleet wants the shared tier."""
    return "disk" if Target.parse(target).node is not None else "remote"


def count_layer(result: LayerResult, goal: Goal, started: float | None) -> None:
    """This node's running totals for one layer (pipeline/stats.py); never fails the task.

    `started` is when the layer's fetch task began on this host (None: unknown, e.g. after
    a retry), so the seconds cover fetch and decompress; publishing is counted by bytes.
    """
    c = context()
    if goal == "disk":
        missed = {"disk": (), "link": (), "remote": ("disk",),
                  "registry": ("disk", "remote")}[result.source or "registry"]
    else:  # the fleet looks in the remote tier first
        missed = {"remote": (), "disk": ("remote",), "link": ("remote",),
                  "registry": ("remote", "disk")}[result.source or "registry"]
    if c.env.remote is None:
        missed = tuple(t for t in missed if t != "remote")
    source: Source = result.source or "registry"
    fetched = {"disk": 0, "link": 0, "remote": 0 if goal == "remote" else
               result.uncompressed_size or 0, "registry": result.layer.size}[source]
    seconds = None if started is None else max(0.0, time.time() - started)
    counts = stats.layer_counts(
        source, missed=missed, fetched_bytes=fetched, seconds=seconds,
        published_bytes=(result.uncompressed_size or 0) if result.published else 0)
    stats.record(c.env.disk.meta, counts)


_images_recorded: set[str] = set()  # jobs whose images this process put in its .meta.db


def _record_job_images(job_id: str) -> None:
    """This node's `.meta.db` learns the job's images (for usage, ls, gc), once per job.

    As the embedded runner does after a warm; a failure here fails no layer.
    """
    if job_id in _images_recorded:
        return
    _images_recorded.add(job_id)
    c = context()
    try:
        c.env.disk.meta.record_images([
            (Digest.parse(x["manifest_digest"]), x["ref"], x["platform"],
             [Digest.parse(d) for d in x["layers"]])
            for x in c.jobs.images(job_id)
        ])
    except (sqlite3.Error, redis.RedisError, LayerwarmError) as e:
        log.warning("could not record the images of job %s in %s: %s",
                    job_id, c.env.disk.meta.path, e)


class LayerTask(Task):
    """What every layer stage shares: its job record, its failure handling.

    Layer tasks keep no Celery result (`ignore_result`): the job record is their outcome,
    and Flower follows them through events. Storing STARTED and SUCCESS cost four Redis
    round trips per task, a third of a tiny layer's.
    """

    def done(self, job_id: str, layer: LayerSpec, target: str, tier: str,
             **extra: Any) -> dict[str, Any]:
        c = context()
        _record_job_images(job_id)
        size = c.env.disk.size(layer.digest)
        c.jobs.update_layer(
            job_id, str(layer.digest), target, state="done", tier=tier, host=c.node,
            bytes_done=layer.size, bytes_total=layer.size, uncompressed_size=size, reason=None,
            **extra,
        )
        log.info("layer %s done for %s from %s on %s", layer.digest, target, tier, c.node)
        return {"digest": str(layer.digest), "target": target, "tier": tier, "host": c.node}

    def carried(self) -> dict[str, Any]:
        """What this chain passes on to its next task besides the token: its followers."""
        then = (self.request.kwargs or {}).get(FOLLOWERS)
        return {FOLLOWERS: list(then)} if then else {}

    def hand_on(self, job_id: str, layer: dict[str, Any]) -> None:
        """This layer's chain ended here: send the fetch of each target that waited for it.

        An all-nodes job with a shared tier sends one target's fetch per layer at first
        (workers/tasks.py `plan`); the others follow once its chain ends, with the layer in
        the shared tier (or, if it failed there, to try the registry themselves). Sent when
        their lease holder is done, they never wait on it: no thread held, no message sent
        again. A cancelled job's followers are already recorded cancelled.
        """
        then = self.carried().get(FOLLOWERS)
        if not then or bookkeeping().jobs.cancelled(job_id, max_age=CANCEL_RECHECK):
            return
        for target in then:  # by name: the tasks module imports this one
            app.send_task("layerwarm.fetch", (job_id, layer, target),
                          queue=Target.parse(target).fetch_queue)

    def fail(self, job_id: str, layer: dict[str, Any], target: str, error: BaseException,
             token: str | None) -> None:
        """Fail the layer at once with its reason; a traceback in the log if it is not ours.
        Its followers' fetches go out, to try the layer themselves.

        Uses only Redis, so it works however the task failed.
        """
        if not isinstance(error, LayerwarmError | OSError):
            log.error("layer %s: unexpected error in %s", layer.get("digest"), self.name,
                      exc_info=error)
        books = bookkeeping()
        digest = str(layer.get("digest"))
        try:
            if token:
                books.leases.release(Digest.parse(digest), token)
            books.jobs.update_layer(job_id, digest, target, state="failed", host=books.node,
                                    reason=describe_error(error))
        except (redis.RedisError, LayerwarmError) as e:
            log.error("layer %s failed (%s) and the job record could not say so: %s",
                      digest, describe_error(error), e)
        log.error("layer failed: %s: %s", digest, layer_reason(digest, describe_error(error)))
        try:
            self.hand_on(job_id, layer)
        except Exception as e:  # noqa: BLE001 - broker away: the sweeper sends them
            log.error("layer %s: its followers' fetches could not be sent: %s", digest, e)

