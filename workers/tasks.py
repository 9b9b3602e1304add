"""Celery tasks: thin wrappers that run pipeline stages and record progress.

    layerwarm.plan        resolve refs, dedupe layers, fan out one fetch per layer and target
    layerwarm.fetch       tiers first (disk, disk by diff_id, remote); else registry -> staging
    layerwarm.decompress  staging -> sha256_<hex> on the same host (its CPU queue)
    layerwarm.publish     disk -> remote tier on the same host (its IO queue)

Arguments are small JSON: job id, the layer's digests/type/size/source repos, the target,
a lease token. Never bytes, never credentials: workers read their own Docker config.
"""

from __future__ import annotations

import functools
import logging
import os
import random
import socket
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import redis
from celery import Task
from celery.exceptions import Retry
from celery.signals import worker_ready

from pipeline import sharing, stages
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
from pipeline.stages import LayerSpec
from workers.app import JOB_TTL, VISIBILITY_TIMEOUT, app, broker_url
from workers.jobs import JobStore
from workers.leases import Leases
from workers.progress import JobProgress
from workers.ratelimit import RedisRateLimiter
from workers.routing import Target, check_node, node_cpu_queue, node_io_queue
from workers.sweeper import start_sweeper

log = logging.getLogger("layerwarm")
MAX_TRANSIENT_RETRIES = 6


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
    client = redis.Redis.from_url(broker_url())
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


def _backoff(error: Exception, failures: int) -> float:
    retry_after = getattr(error, "retry_after", None)
    if retry_after is not None:
        return retry_after
    return min(2.0**failures, 60.0) * random.uniform(0.5, 1.5)


class LayerTask(Task):
    """What every layer stage shares: its job record, its failure handling."""

    def done(self, job_id: str, layer: LayerSpec, target: str, tier: str,
             **extra: Any) -> dict[str, Any]:
        c = context()
        size = c.env.disk.size(layer.digest)
        c.jobs.update_layer(
            job_id, str(layer.digest), target, state="done", tier=tier, host=c.node,
            bytes_done=layer.size, bytes_total=layer.size, uncompressed_size=size, reason=None,
            **extra,
        )
        log.info("layer %s done for %s from %s on %s", layer.digest, target, tier, c.node)
        return {"digest": str(layer.digest), "target": target, "tier": tier, "host": c.node}

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
            result = resolve_all(Resolver(c.env.client), parsed, wanted, p)
    except Exception as e:  # a job must never stay "planning" forever
        c.jobs.planned(job_id, [], [{"ref": r, "error": describe_error(e)} for r in refs])
        raise
    work = [(layer_to_json(x), t) for x in result.layers for t in targets]
    c.jobs.planned(
        job_id,
        [{**layer, "target": t, "order": i} for i, (layer, t) in enumerate(work)],
        [{"ref": f.ref, "error": f.error} for f in result.failures],
    )
    for layer, t in work:
        fetch.apply_async((job_id, layer, t), queue=Target.parse(t).fetch_queue)
    return {"layers": len(result.layers), "tasks": len(work), "failed_refs": len(result.failures)}


@app.task(name="layerwarm.fetch", bind=True, base=LayerTask, max_retries=None)
def fetch(self: LayerTask, job_id: str, layer: dict[str, Any], target: str,
          failures: int = 0, token: str | None = None) -> dict[str, Any]:
    c = context()
    spec, tgt = layer_from_json(layer), Target.parse(target)
    progress = JobProgress(self, c.jobs, job_id, target, c.node)
    disk, remote = c.env.disk, c.env.remote
    try:
        # Where it should be already? A node target also accepts a copy from the remote tier.
        if tgt.node is not None:
            with disk.lock(spec.digest):
                on_disk = stages.check_disk(spec, disk) is not None
                row = disk.meta.layer(spec.digest) if on_disk else None
                shared = None if on_disk else sharing.share(spec, disk)
            if shared is not None:  # same content on this disk under another digest: linked
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
                    if stages.restore(spec, disk, remote, progress) is not None:
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
                stages.fetch(c.env.client, spec, disk, progress)
        if disk.has(spec.digest):  # decompressed here before; only the remote tier lacks it
            publish.apply_async((job_id, layer, target), {"token": token, "tier": tier},
                                queue=node_io_queue(c.node))
        else:
            decompress.apply_async((job_id, layer, target), {"token": token},
                                   queue=node_cpu_queue(c.node))
        return {"digest": str(spec.digest), "staged_on": c.node}
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


@app.task(name="layerwarm.decompress", bind=True, base=LayerTask, max_retries=None)
def decompress(self: LayerTask, job_id: str, layer: dict[str, Any], target: str,
               token: str | None = None, failures: int = 0) -> dict[str, Any]:
    c = context()
    spec = layer_from_json(layer)
    progress = JobProgress(self, c.jobs, job_id, target, c.node)
    disk = c.env.disk
    try:
        kept = c.leases.kept(spec.digest, token) if token else nullcontext()
        with kept, disk.lock(spec.digest):
            if not disk.has(spec.digest):
                staging = disk.staging_path(spec.digest)
                if not staging.exists():  # lost since the fetch (e.g. a wiped disk): again
                    fetch.apply_async((job_id, layer, target), {"token": token},
                                      queue=node_io_queue(c.node))
                    return {"digest": str(spec.digest), "refetch": True}
                size = stages.decompress(spec, disk, staging, progress, c.settings.limits)
                log.info("layer decompressed and cached: %s (%d bytes) %s",
                         spec.digest, size, disk.path(spec.digest))
        if c.env.remote is not None:
            if Target.parse(target).node is not None:
                # The node has the layer: its job is done; the shared copy follows.
                self.done(job_id, spec, target, "registry", publish="pending")
            publish.apply_async((job_id, layer, target), {"token": token},
                                queue=node_io_queue(c.node))
            return {"digest": str(spec.digest), "publish_on": c.node}
        if token:
            c.leases.release(spec.digest, token)
        return self.done(job_id, spec, target, "registry")
    except Retry:
        raise
    except (LayerwarmError, OSError) as e:
        self.fail(job_id, spec, target, e, token)
        raise
    except Exception as e:  # not ours (e.g. the broker connection dropped): retry, bounded
        log.exception("layer %s: unexpected error in decompress", spec.digest)
        raise self.retry_transient(job_id, spec, target, e, token, failures,
                                   node_cpu_queue(c.node)) from e


@app.task(name="layerwarm.publish", bind=True, base=LayerTask, max_retries=None)
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
            stages.publish(spec, c.env.disk, remote, progress)
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


@worker_ready.connect
def _start_sweeper(sender: Any = None, **_: Any) -> None:
    # One sweeper per IO worker process; CPU workers only decompress.
    if str(getattr(sender, "hostname", "")).startswith("io@"):
        start_sweeper(context().jobs, stall=2 * VISIBILITY_TIMEOUT)


def enqueue_job(job_id: str, refs: Sequence[str], targets: Sequence[str],
                platform: str | None) -> None:
    """Start a job: planning runs on any worker, which then fans out the layer tasks."""
    plan.apply_async((job_id, list(refs), list(targets), platform), task_id=f"{job_id}-plan")
