"""Celery tasks: thin wrappers that run pipeline stages and record progress.

    layerwarm.plan        resolve refs, dedupe layers, fan out one fetch per layer and target
                          (tiny layers: one fetch_batch per 20, running fetch for each)
    layerwarm.fetch       tiers first (disk, disk by diff_id, remote); else registry -> staging,
                          sending the decompress task as the download starts (a layer of at
                          most 256 KiB goes on to disk, and the fleet's remote tier, in this
                          same task instead)
    layerwarm.decompress  staging -> sha256_<hex> on the same host (its CPU queue), following
                          the download as it arrives
    layerwarm.publish     disk -> remote tier on the same host (its IO queue)
    layerwarm.gc_all_nodes  (Celery beat) send one layerwarm.gc to every live node's IO queue
    layerwarm.gc          gc of this node's disk to its quota (pipeline.gc.scheduled_collect)

Arguments are small JSON: job id, the layer's digests/type/size/source repos, the target,
a lease token. Never bytes, never credentials: workers read their own Docker config.
"""

from __future__ import annotations

import functools
import logging
import os
import random
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import redis
from celery import Task
from celery.exceptions import Retry
from celery.signals import worker_ready

from pipeline import codecs, gc, sharing, sinks, stages, stats
from pipeline.config import Settings
from pipeline.digest import Digest
from pipeline.errors import (
    LayerwarmError,
    NotFound,
    PermanentError,
    RemoteTierUnavailable,
    TransientError,
    VerificationError,
)
from pipeline.manifest import Platform
from pipeline.plan import Resolver, resolve_all
from pipeline.reference import Reference
from pipeline.runner import Environment, describe_error
from pipeline.stages import LayerSpec, Source
from pipeline.tiers.remote import RemoteTier
from workers.app import GC_INTERVAL, JOB_TTL, VISIBILITY_TIMEOUT, app, broker_url
from workers.jobs import JobStore
from workers.leases import Leases
from workers.progress import JobProgress
from workers.ratelimit import RedisRateLimiter
from workers.redisconn import connect
from workers.routing import Target, check_node, node_cpu_queue, node_io_queue
from workers.sweeper import start_sweeper

log = logging.getLogger("layerwarm")
MAX_TRANSIENT_RETRIES = 6
# Layers up to this compressed size are decompressed (and, for the fleet, published) by
# the fetch task itself: for tiny layers the hops between tasks, not the work, were the cost.
INLINE_DECOMPRESS_BYTES = 256 << 10
TINY_BATCH = 20  # tiny layers per fetch_batch task
DEFER_SECONDS = 0.2  # a decompress put back behind ready work comes round again after this
MAX_DEFERRALS = 50   # ... at most this many times (10 s), then it follows its download


@dataclass
class WorkerContext:
    node: str
    env: Environment
    settings: Settings
    jobs: JobStore
    leases: Leases


@functools.cache
def context() -> WorkerContext:
    """Per worker process: settings, registry client, tiers, Redis, built once."""
    settings = Settings.from_env()
    client = connect(broker_url())
    lease_ttl = float(os.environ.get("LAYERWARM_LEASE_TTL") or 120)
    limiter = RedisRateLimiter(client, settings.registry_rate) if settings.registry_rate else None
    return WorkerContext(
        node=check_node(os.environ.get("LAYERWARM_NODE") or socket.gethostname()),
        env=Environment.from_settings(settings, limiter),
        settings=settings,
        jobs=JobStore(client, JOB_TTL),
        leases=Leases(client, lease_ttl),
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


def _count(source: Source, started: float | None, *, missed: Sequence[str] = (),
           fetched: int = 0) -> None:
    """This node's running totals for one layer (pipeline/stats.py); never fails the task.

    `started` is when the layer's fetch task began on this host (None: unknown, e.g. after
    a retry), so the seconds cover fetch and decompress; publishing is counted by bytes.
    """
    seconds = None if started is None else max(0.0, time.time() - started)
    counts = stats.layer_counts(source, missed=missed, fetched_bytes=fetched, seconds=seconds)
    stats.record(context().env.disk.meta, counts)


def _count_from_registry(layer: LayerSpec, started: float | None) -> None:
    # It looked on disk, and in the remote tier when there is one, first.
    missed = ("disk", "remote") if context().env.remote is not None else ("disk",)
    _count("registry", started, missed=missed, fetched=layer.size)


def _publish_counted(layer: LayerSpec, remote: RemoteTier, progress: JobProgress) -> None:
    c = context()
    if stages.publish(layer, c.env.disk, remote, progress):
        stats.record(c.env.disk.meta, {stats.PUBLISHED: c.env.disk.size(layer.digest) or 0})


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


def _backoff(error: Exception, failures: int) -> float:
    retry_after = getattr(error, "retry_after", None)
    if retry_after is not None:
        return retry_after
    return min(2.0**failures, 60.0) * random.uniform(0.5, 1.5)


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

    def decompressed(self, job_id: str, layer_json: dict[str, Any], layer: LayerSpec,
                     target: str, token: str | None) -> dict[str, Any]:
        """The layer is on this host's disk from the registry: publish it, or finish."""
        c = context()
        if c.env.remote is not None:
            if Target.parse(target).node is not None:
                # The node has the layer: its job is done; the shared copy follows.
                self.done(job_id, layer, target, "registry", publish="pending")
            publish.apply_async((job_id, layer_json, target), {"token": token},
                                queue=node_io_queue(c.node))
            return {"digest": str(layer.digest), "publish_on": c.node}
        if token:
            c.leases.release(layer.digest, token)
        return self.done(job_id, layer, target, "registry")

    def fail(self, job_id: str, layer: LayerSpec, target: str, error: BaseException,
             token: str | None) -> None:
        c = context()
        if token:
            c.leases.release(layer.digest, token)
        c.jobs.update_layer(
            job_id, str(layer.digest), target, state="failed", host=c.node,
            reason=describe_error(error),
        )

    def retry_transient(self, job_id: str, layer: LayerSpec, target: str, error: Exception,
                        token: str | None, failures: int, queue: str) -> Retry:
        """Retry with backoff (honouring Retry-After) or, past the limit, fail the layer.

        The retry keeps the task's arguments and starts again from the tiers: every stage
        is idempotent by content address, so a partial first try costs nothing but time.
        """
        if token:
            context().leases.release(layer.digest, token)
        if failures >= MAX_TRANSIENT_RETRIES:
            self.fail(job_id, layer, target, error, None)
            raise error
        log.warning("layer %s: %s; retry %d", layer.digest, describe_error(error), failures + 1)
        return self.retry(
            countdown=_backoff(error, failures), queue=queue,  # other kwargs (tier) carry on
            kwargs={**(self.request.kwargs or {}), "failures": failures + 1, "token": None},
        )


@app.task(name="layerwarm.plan", bind=True)
def plan(self: Task, job_id: str, refs: list[str], targets: list[str],
         platform: str | None) -> dict[str, Any]:
    c = context()
    wanted = None if platform == "all" else Platform.parse(platform or str(Platform.host()))
    parsed = [Reference.parse(r) for r in refs]
    try:
        with ThreadPoolExecutor(c.settings.io_threads, thread_name_prefix="layerwarm-plan") as p:
            result = resolve_all(Resolver(c.env.client, c.env.disk.meta), parsed, wanted, p)
    except Exception as e:  # a job must never stay "planning" forever
        c.jobs.planned(job_id, [], [{"ref": r, "error": describe_error(e)} for r in refs])
        raise
    work = [(layer_to_json(x), t) for x in result.layers for t in targets]
    c.jobs.planned(
        job_id,
        [{**layer, "target": t, "order": i} for i, (layer, t) in enumerate(work)],
        [{"ref": f.ref, "error": f.error} for f in result.failures],
        [{"manifest_digest": str(x.manifest_digest), "ref": str(x.ref),
          "platform": str(x.platform) if x.platform else None,
          "layers": [str(y.digest) for y in x.layers]} for x in result.images],
    )

    # Tiny layers travel in batches (one task, one after another); the others one a task,
    # largest first: the fleet queue then hands the big ones out first and the small ones
    # to whichever host frees up first, which spreads the bytes (and so the decompression
    # each host must do itself) evenly across hosts.
    tiny: dict[str, list[dict[str, Any]]] = {}
    sends: list[Callable[[], Any]] = []
    for layer, t in sorted(work, key=lambda w: -int(w[0]["size"])):
        if int(layer["size"]) > INLINE_DECOMPRESS_BYTES:
            sends.append(functools.partial(fetch.apply_async, (job_id, layer, t),
                                           queue=Target.parse(t).fetch_queue))
        else:
            tiny.setdefault(t, []).append(layer)
    for t, layers in tiny.items():
        sends += [functools.partial(fetch_batch.apply_async,
                                    (job_id, layers[i:i + TINY_BATCH], t),
                                    queue=Target.parse(t).fetch_queue)
                  for i in range(0, len(layers), TINY_BATCH)]
    # Each send is a Redis round trip or two; a job of thousands of layers sends side by side.
    with ThreadPoolExecutor(c.settings.io_threads, thread_name_prefix="layerwarm-send") as p:
        list(p.map(lambda send: send(), sends))
    return {"layers": len(result.layers), "tasks": len(sends),
            "failed_refs": len(result.failures)}


@app.task(name="layerwarm.fetch", bind=True, base=LayerTask, max_retries=None,
          ignore_result=True)
def fetch(self: LayerTask, job_id: str, layer: dict[str, Any], target: str,
          failures: int = 0, token: str | None = None) -> dict[str, Any]:
    c = context()
    started = time.time()
    spec, tgt = layer_from_json(layer), Target.parse(target)
    progress = JobProgress(self, c.jobs, job_id, target, c.node,
                           quiet_start=spec.size <= INLINE_DECOMPRESS_BYTES)
    disk, remote = c.env.disk, c.env.remote
    try:
        # Where it should be already? A node target also accepts a copy from the remote tier.
        if tgt.node is not None:
            with disk.lock(spec.digest):
                on_disk = stages.check_disk(spec, disk) is not None
                row = disk.meta.layer(spec.digest) if on_disk else None
                shared = None if on_disk else sharing.share(spec, disk)
            if on_disk:
                _count("disk", started)
            if shared is not None:  # same content on this disk under another digest: linked
                _count("link", started)
                if remote is None:
                    return self.done(job_id, spec, target, "link", shared_from=str(shared.source))
                publish.apply_async((job_id, layer, target), queue=node_io_queue(c.node))
                return self.done(job_id, spec, target, "link", shared_from=str(shared.source),
                                 publish="pending")
            if on_disk and remote is not None and row is not None and row.publish_pending:
                # Warm here already, but an earlier publish could not reach the remote tier.
                publish.apply_async((job_id, layer, target), queue=node_io_queue(c.node))
                return self.done(job_id, spec, target, "disk", publish="pending")
            if on_disk:
                return self.done(job_id, spec, target, "disk")
            if remote is not None:
                try:
                    if (size := stages.restore(spec, disk, remote, progress)) is not None:
                        _count("remote", started, missed=("disk",), fetched=size)
                        return self.done(job_id, spec, target, "remote")
                except (RemoteTierUnavailable, VerificationError, NotFound) as e:
                    # The node's warm does not wait for the shared tier: go to the registry;
                    # the publish after it keeps trying the remote tier.
                    log.warning("layer %s: remote tier not usable (%s); using the registry",
                                spec.digest, describe_error(e))
                    remote = None
        else:
            if remote is None:
                raise PermanentError(f"node {c.node} has no remote tier (set LAYERWARM_REMOTE)")
            if remote.stat(spec.digest) is not None:
                _count("remote", started)
                return self.done(job_id, spec, target, "remote")

        # One registry fetch per fleet: whoever holds the lease fetches; others come back
        # later and find the layer in the remote tier.
        if remote is not None:
            token = token or Leases.new_token(c.node)
            if not c.leases.acquire(spec.digest, token):
                c.jobs.update_layer(job_id, str(spec.digest), target, state="pending",
                                    waiting=c.leases.holder(spec.digest))
                raise self.retry(countdown=random.uniform(1.0, 3.0), queue=tgt.fetch_queue,
                                 kwargs={"failures": failures, "token": None})
            if remote.stat(spec.digest) is not None:  # finished while we waited for the lease
                c.leases.release(spec.digest, token)
                raise self.retry(countdown=0, queue=tgt.fetch_queue,
                                 kwargs={"failures": failures, "token": None})

        kept = c.leases.kept(spec.digest, token) if token else nullcontext()
        inline = False
        tier = "registry"
        with kept, disk.lock(spec.digest):
            # A remote target: content this worker holds under another digest is linked
            # here and published, instead of fetched (a node target looked above).
            shared = None
            if not disk.has(spec.digest) and tgt.node is None:
                shared = sharing.share(spec, disk)
            if shared is not None:
                tier = "link"
                c.jobs.update_layer(job_id, str(spec.digest), target,
                                    shared_from=str(shared.source))
            if not disk.has(spec.digest):
                log.info("fetching layer from registry: %s (%d bytes)", spec.digest, spec.size)
                inline = spec.size <= INLINE_DECOMPRESS_BYTES
                if not inline:
                    # Sent first, so the decompression follows the download as it arrives
                    # (stages.decompress_following) instead of waiting for its end.
                    decompress.apply_async((job_id, layer, target),
                                           {"token": token, "started": started},
                                           queue=node_cpu_queue(c.node))
                staging = stages.fetch(c.env.client, spec, disk, progress)
                if inline:
                    # Inflating this takes less than the hop to the CPU queue would.
                    stages.decompress(spec, disk, staging, progress, c.settings.limits)
                    _count_from_registry(spec, started)
                else:
                    return {"digest": str(spec.digest), "staged_on": c.node}
        if inline and tgt.node is None and remote is not None:
            # A fleet layer is done once shared; for a tiny one that is quicker than a task.
            _publish_counted(spec, remote, progress)
            if token:
                c.leases.release(spec.digest, token)
            return self.done(job_id, spec, target, "registry", publish="done")
        if inline:
            return self.decompressed(job_id, layer, spec, target, token)
        # On disk before this task, or linked by it; only the remote tier lacks it.
        if tier == "link":
            _count("link", started, missed=("remote",))
        else:
            _count("disk", started, missed=("remote",) if remote is not None else ())
        publish.apply_async((job_id, layer, target), {"token": token, "tier": tier},
                            queue=node_io_queue(c.node))
        return {"digest": str(spec.digest), "on_disk": c.node}
    except Retry:
        raise
    except (LayerwarmError, OSError) as e:
        if not isinstance(e, TransientError):
            self.fail(job_id, spec, target, e, token)
            raise
        raise self.retry_transient(job_id, spec, target, e, token, failures,
                                   tgt.fetch_queue) from e
    except Exception as e:  # not ours (e.g. the broker connection dropped): retry, bounded
        log.exception("layer %s: unexpected error in fetch", spec.digest)
        raise self.retry_transient(job_id, spec, target, e, token, failures,
                                   tgt.fetch_queue) from e


@app.task(name="layerwarm.fetch_batch", bind=True, ignore_result=True)
def fetch_batch(self: Task, job_id: str, layers: list[dict[str, Any]],
                target: str) -> dict[str, Any]:
    """Tiny layers of one job and target, each through the fetch task's own code, here.

    A layer that would have been retried (a busy lease, a transient error) goes on as its
    own fetch task, which retries it; a layer that failed for good is already recorded.
    """
    requeued = 0
    for layer in layers:
        try:
            fetch(job_id, layer, target)  # a direct call: runs now, in this task
        except Exception as e:
            if isinstance(e, (LayerwarmError, OSError)) and not isinstance(e, TransientError):
                continue  # failed for good; `fetch` recorded it in the job
            requeued += 1
            fetch.apply_async((job_id, layer, target), countdown=random.uniform(0.5, 2.0),
                              queue=Target.parse(target).fetch_queue)
    return {"layers": len(layers), "requeued": requeued}


@app.task(name="layerwarm.decompress", bind=True, base=LayerTask, max_retries=None,
          ignore_result=True)
def decompress(self: LayerTask, job_id: str, layer: dict[str, Any], target: str,
               token: str | None = None, failures: int = 0,
               started: float | None = None, deferrals: int = 0) -> dict[str, Any]:
    """Decompress the blob this host's fetch task is downloading (sent as it starts).

    It follows the download as it arrives and commits once the fetch has verified the
    blob. If the fetch fails, the fetch task retries or fails the layer, and this ends
    without touching the job. While another layer's blob is staged whole on this host, it
    does not wait on its own download: it goes back in the queue behind that one.
    """
    c = context()
    spec = layer_from_json(layer)
    progress = JobProgress(self, c.jobs, job_id, target, c.node)
    disk = c.env.disk
    if deferrals < MAX_DEFERRALS and stages.better_later(spec, disk):
        # Its download is still running and another layer's blob is ready here: that
        # one goes first (it is ahead in this queue); this comes back in a moment. Only
        # so often: a blob left staged by a crash would otherwise keep it going round.
        decompress.apply_async(
            (job_id, layer, target), {**(self.request.kwargs or {}), "deferrals": deferrals + 1},
            queue=node_cpu_queue(c.node), countdown=DEFER_SECONDS)
        return {"digest": str(spec.digest), "deferred": deferrals + 1}
    try:
        kept = c.leases.kept(spec.digest, token) if token else nullcontext()
        with kept:
            outcome = stages.decompress_following(spec, disk, progress, c.settings.limits)
        if outcome is None:
            log.info("layer %s: the fetch left no blob to decompress", spec.digest)
            return {"digest": str(spec.digest), "fetch_failed": True}
        size, made = outcome
        if made:
            _count_from_registry(spec, started)
            log.info("layer decompressed and cached: %s (%d bytes) %s",
                     spec.digest, size, disk.path(spec.digest))
        return self.decompressed(job_id, layer, spec, target, token)
    except Retry:
        raise
    except (LayerwarmError, OSError) as e:
        self.fail(job_id, spec, target, e, token)
        raise
    except Exception as e:  # not ours (e.g. the broker connection dropped): retry, bounded
        log.exception("layer %s: unexpected error in decompress", spec.digest)
        raise self.retry_transient(job_id, spec, target, e, token, failures,
                                   node_cpu_queue(c.node)) from e


@app.task(name="layerwarm.publish", bind=True, base=LayerTask, max_retries=None,
          ignore_result=True)
def publish(self: LayerTask, job_id: str, layer: dict[str, Any], target: str,
            token: str | None = None, failures: int = 0, tier: str = "registry") -> dict[str, Any]:
    c = context()
    spec = layer_from_json(layer)
    progress = JobProgress(self, c.jobs, job_id, target, c.node)
    remote = c.env.remote
    try:
        if remote is None:
            raise PermanentError(f"node {c.node} has no remote tier (set LAYERWARM_REMOTE)")
        kept = c.leases.kept(spec.digest, token) if token else nullcontext()
        with kept:
            _publish_counted(spec, remote, progress)
        if token:
            c.leases.release(spec.digest, token)
        if Target.parse(target).node is not None:
            c.jobs.update_layer(job_id, str(spec.digest), target, state="done", publish="done")
            return {"digest": str(spec.digest), "published_by": c.node}
        return self.done(job_id, spec, target, tier, publish="done")
    except Retry:
        raise
    except TransientError as e:
        if Target.parse(target).node is None:
            raise self.retry_transient(job_id, spec, target, e, token, failures,
                                       node_io_queue(c.node)) from e
        # The node is warm; keep trying the shared tier, patiently, for as long as it takes.
        if token:
            c.leases.release(spec.digest, token)
        c.jobs.update_layer(job_id, str(spec.digest), target, state="done",
                            publish="pending", publish_error=describe_error(e))
        raise self.retry(countdown=min(_backoff(e, failures), 300.0), queue=node_io_queue(c.node),
                         kwargs={"failures": failures + 1, "token": None}) from e
    except (LayerwarmError, OSError) as e:
        self.fail(job_id, spec, target, e, token)
        raise
    except Exception as e:  # not ours (e.g. the broker connection dropped): retry, bounded
        log.exception("layer %s: unexpected error in publish", spec.digest)
        raise self.retry_transient(job_id, spec, target, e, token, failures,
                                   node_io_queue(c.node)) from e


@app.task(name="layerwarm.gc")
def gc_node() -> dict[str, Any]:
    """gc of this node's disk against its own LAYERWARM_MAX_CACHE_SIZE; no-op when unset."""
    c = context()
    report = gc.scheduled_collect(c.env.disk, c.settings)
    if report is None:
        return {"node": c.node, "skipped": "LAYERWARM_MAX_CACHE_SIZE is not set"}
    return {"node": c.node, "evicted": len(report.evicted), "freed": report.freed,
            "swept": len(report.swept), "size_after": report.size_after,
            "under_quota": report.under_quota}


@app.task(name="layerwarm.gc_all_nodes")
def gc_all_nodes() -> dict[str, Any]:
    """What beat sends: one gc per live worker host, on that host's own IO queue."""
    from workers.cli import live_nodes  # the same "all nodes" as `submit --to all-nodes`

    nodes = live_nodes()
    for node in nodes:
        # A gc that waited a whole interval in a queue is superseded by the next one.
        gc_node.apply_async(queue=node_io_queue(node), expires=GC_INTERVAL)
    return {"nodes": nodes}


@worker_ready.connect
def _ready(sender: Any = None, **_: Any) -> None:
    """Before the first task: build the context and load what the stages load on first
    use (codecs, writeback, the remote tier's client), so a job does not wait on it (in
    a fleet of two hosts that was four processes importing boto3 in a job's first second).
    IO workers also start the sweeper; CPU workers only decompress."""
    c = context()
    codecs.preload()
    sinks.preload()
    if str(getattr(sender, "hostname", "")).startswith("io@"):
        start_sweeper(c.jobs, stall=2 * VISIBILITY_TIMEOUT)
        if c.env.remote is not None:
            # On a thread: an unreachable endpoint takes its timeouts, and the worker must
            # take tasks meanwhile (a task needing the client waits for it, or makes it).
            threading.Thread(target=_connect, args=(c.env.remote,), daemon=True,
                             name="layerwarm-connect").start()


def _connect(remote: RemoteTier) -> None:
    try:
        remote.connect()
    except LayerwarmError as e:  # the tasks meet it again, and handle it there
        log.warning("remote tier %s: %s", remote.url, describe_error(e))
