"""Celery tasks: thin wrappers that run one step of the lookup chain and record the outcome.

    layerwarm.plan        resolve refs, dedupe layers, fan out one fetch per layer and target
                          (tiny layers: one fetch_batch per 20, running fetch for each);
                          with a shared tier and several targets, one target's fetch per
                          layer, whose chain sends the others' when it ends (`_owners`)
    layerwarm.fetch       the chain (pipeline/chain.py) for the target's goal: the tiers in
                          order; on a miss, registry -> staging, sending the decompress task
                          as the download starts (a layer of at most 256 KiB is decompressed,
                          and written back, in this same task instead)
    layerwarm.decompress  staging -> sha256_<hex> on the same host (its CPU queue), following
                          the download as it arrives
    layerwarm.publish     the chain's write-back: disk -> remote tier on the same host
    layerwarm.gc_all_nodes  (Celery beat) send one layerwarm.gc to every live node's IO queue
    layerwarm.gc          gc of this node's disk to its quota (pipeline.gc.scheduled_collect)

The order of the tiers, what is written back, verification and retries all live in
pipeline/: a task decodes its arguments, makes one call, and records what happened. A
registry error has been retried by the one retry policy (pipeline/retry.py) before it
gets here: a task never retries it again. A fetch waits only while another worker holds
the layer's lease (jobs that overlap: in its thread, woken by the release; by retrying
when no wait slot is free or the wait ran out), and a node's publish is tried again
while the remote tier does not answer (the node is warm meanwhile); any other error
fails the layer at once, with its reason in the job record.

Arguments are small JSON: job id, the layer's digests/type/size/source repos, the target,
a lease token. Never bytes, never credentials: workers read their own Docker config.
"""

from __future__ import annotations

import functools
import logging
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from celery import Task
from celery.exceptions import Retry

from pipeline import gc, stages, stats
from pipeline.digest import Digest
from pipeline.errors import LayerwarmError, PermanentError
from pipeline.following import better_later, decompress_following
from pipeline.layer import NO_PROGRESS, LayerResult, LayerSpec, Progress
from pipeline.manifest import Platform
from pipeline.plan import resolve_all
from pipeline.reference import Reference
from pipeline.runner import describe_error
from workers.app import GC_INTERVAL, app
from workers.layertask import (
    CANCEL_RECHECK,
    LayerTask,
    LeaseBusy,
    bookkeeping,
    context,
    count_layer,
    goal_of,
    layer_from_json,
    layer_to_json,
)
from workers.leases import LeaseLost, Leases
from workers.progress import JobProgress
from workers.routing import FOLLOWERS, Target, node_cpu_queue, node_io_queue, spread

log = logging.getLogger("layerwarm")
# Layers up to this compressed size are decompressed (and written back) by the fetch task
# itself: for tiny layers the hops between tasks, not the work, were the cost.
INLINE_DECOMPRESS_BYTES = 256 << 10
TINY_BATCH = 20  # tiny layers per fetch_batch task
DEFER_SECONDS = 0.2  # a decompress put back behind ready work comes round again after this
MAX_DEFERRALS = 50   # ... at most this many times (10 s), then it follows its download
LEASE_WAIT = (1.0, 3.0)  # seconds (uniform) before asking again for a busy lease
PUBLISH_BACKOFF = (2.0, 300.0)  # a node's owed publish: first wait, longest wait (seconds)


def _no_registry(layer: LayerSpec, progress: Progress) -> None:
    """The registry step of a chain used only for its write-back rules."""
    raise AssertionError("a write-back chain never asks the registry")



@app.task(name="layerwarm.plan", bind=True)
def plan(self: Task, job_id: str, refs: list[str], targets: list[str],
         platform: str | None) -> dict[str, Any]:
    if bookkeeping().jobs.cancelled(job_id):
        return {"cancelled": True}
    try:
        c = context()
        wanted = None if platform == "all" else Platform.parse(platform or str(Platform.host()))
        parsed = [Reference.parse(r) for r in refs]
        with ThreadPoolExecutor(c.settings.io_threads, thread_name_prefix="layerwarm-plan") as p:
            result = resolve_all(c.env.resolver(keep_configs=True), parsed, wanted, p)
    except Exception as e:  # a job must never stay "planning" forever
        if not isinstance(e, LayerwarmError | OSError):
            log.exception("job %s: unexpected error in plan", job_id)
        bookkeeping().jobs.planned(
            job_id, [], [{"ref": r, "error": describe_error(e)} for r in refs])
        raise
    layers_json = [layer_to_json(x) for x in result.layers]
    # Largest first: the fleet queue hands the big ones out first and the small ones to
    # whichever host's IO pool frees up first, so no host starts a big layer last. It
    # does not even out the decompression each host must do itself: an IO pool takes
    # fleet fetches as its threads free up, whatever its node's CPU pool has queued
    # (docs/DISTRIBUTED.md, what the fleet costs over the embedded runner).
    ordered = sorted(layers_json, key=lambda x: -int(x["size"]))
    big = [x for x in ordered if int(x["size"]) > INLINE_DECOMPRESS_BYTES]
    owners = _owners(big, targets) if c.env.remote is not None else {}
    records = []
    for i, (layer, t) in enumerate((x, t) for x in layers_json for t in targets):
        first = owners.get(layer["digest"], t)  # "after": the target this one follows
        records.append({**layer, "target": t, "order": i,
                        **({"after": first} if first != t else {})})
    c.jobs.planned(
        job_id,
        records,
        [{"ref": f.ref, "error": f.error} for f in result.failures],
        [{"manifest_digest": str(x.manifest_digest), "ref": str(x.ref),
          "platform": str(x.platform) if x.platform else None,
          "layers": [str(y.digest) for y in x.layers]} for x in result.images],
    )

    sends = _sends(job_id, ordered, targets, owners)
    # Each send is a Redis round trip or two; a job of thousands of layers sends side by side.
    with ThreadPoolExecutor(c.settings.io_threads, thread_name_prefix="layerwarm-send") as p:
        list(p.map(lambda send: send(), sends))
    return {"layers": len(result.layers), "tasks": len(sends),
            "failed_refs": len(result.failures)}


def _sends(job_id: str, ordered: list[dict[str, Any]], targets: list[str],
           owners: dict[str, str]) -> list[Callable[[], Any]]:
    """The job's first messages, unsent, for its layers (largest first) and targets.

    Tiny layers travel in batches (one task, one after another); the others one a task.
    With a shared tier, a layer's owner fetches it and the other targets follow once it
    is there (`_owners`); without one, several node targets each start on their own
    share of the layers (routing.spread), so they do not reach the same layer at once.
    """
    tiny: dict[str, list[dict[str, Any]]] = {}
    sends: list[Callable[[], Any]] = []
    for layer in (x for x in ordered if x["digest"] in owners):  # over 256 KiB
        first = owners[layer["digest"]]
        sends.append(functools.partial(
            fetch.apply_async, (job_id, layer, first),
            {FOLLOWERS: [t for t in targets if t != first]},
            queue=Target.parse(first).fetch_queue))
    for layer, t in spread(ordered, targets):
        if int(layer["size"]) <= INLINE_DECOMPRESS_BYTES:
            tiny.setdefault(t, []).append(layer)
        elif not owners:
            sends.append(functools.partial(fetch.apply_async, (job_id, layer, t),
                                           queue=Target.parse(t).fetch_queue))
    for t, layers in tiny.items():
        sends += [functools.partial(fetch_batch.apply_async,
                                    (job_id, layers[i:i + TINY_BATCH], t),
                                    queue=Target.parse(t).fetch_queue)
                  for i in range(0, len(layers), TINY_BATCH)]
    return sends


def _owners(layers: list[dict[str, Any]], targets: list[str]) -> dict[str, str]:
    """Which target fetches each layer first, when several share a tier: the others'
    fetches follow once its chain ends (`LayerTask.hand_on`), finding the layer there.

    Sent all at once, every target but the lease holder found the layer busy: its fetch
    held a thread waiting on the lease, or, with no wait slot free, went back in the queue
    and came round again (a message and a job-record write each time), a cost that grows
    with the number of hosts. Owners take the layers in turn, largest first, so each host
    starts on an even share of the bytes (as `spread` orders them). One target: no owner.
    """
    if len(targets) < 2:
        return {}
    return {x["digest"]: targets[i % len(targets)] for i, x in enumerate(layers)}


@app.task(name="layerwarm.fetch", bind=True, base=LayerTask, max_retries=None,
          ignore_result=True)
def fetch(self: LayerTask, job_id: str, layer: dict[str, Any], target: str,
          token: str | None = None, **_: Any) -> dict[str, Any]:
    """The chain for this target's goal; on a miss the registry step starts here.

    While another node holds the layer's lease, it waits for its release here (up to the
    lease's ttl, if a wait slot is free: `_lease_wait`) and runs the chain again; else it
    goes back in the queue for LEASE_WAIT seconds."""
    started = time.time()
    wait_until: float | None = None
    while True:
        try:
            return _fetch(self, job_id, layer, target, token, started)
        except LeaseBusy as e:
            books = bookkeeping()
            books.jobs.progress_layer(job_id, layer["digest"], target, state="pending",
                                      waiting=e.holder)
            if wait_until is None:
                wait_until = time.monotonic() + books.leases.ttl_ms / 1000
            token = None  # the lease is another's: a token this fetch carried is spent
            if self.request.called_directly or not _lease_wait(
                    books.leases, Digest.parse(layer["digest"]), wait_until):
                raise self.retry(countdown=random.uniform(*LEASE_WAIT), exc=e,
                                 queue=Target.parse(target).fetch_queue,
                                 kwargs={"token": None, **self.carried()}) from e


def _fetch(self: LayerTask, job_id: str, layer: dict[str, Any], target: str,
           token: str | None, started: float) -> dict[str, Any]:
    """One run of the fetch task's chain; raises LeaseBusy for `fetch` to wait on."""
    try:
        if _skip_cancelled(job_id, layer, target, token):
            return {"digest": layer["digest"], "cancelled": True}
        c = context()
        spec, goal = layer_from_json(layer), goal_of(target)
        if goal == "remote" and c.env.remote is None:
            raise PermanentError(f"node {c.node} has no remote tier (set LAYERWARM_REMOTE)")
        progress = JobProgress(self, c.jobs, job_id, target, c.node, c.run,
                               quiet_start=spec.size <= INLINE_DECOMPRESS_BYTES)

        def claim() -> None:  # with a shared tier, one worker of the fleet fetches a layer
            nonlocal token
            if c.env.remote is not None:
                token = token or Leases.new_token(c.node)
                holder = c.leases.try_acquire(spec.digest, token)
                if holder is not None:
                    raise LeaseBusy(holder)
                progress.lease = token

        def registry(layer_: LayerSpec, progress_: Progress) -> int | None:
            if spec.size <= INLINE_DECOMPRESS_BYTES:  # less work than a hop to the CPU queue
                staging = stages.fetch(c.env.client, layer_, c.env.disk, progress_)
                return stages.decompress(layer_, c.env.disk, staging, progress_,
                                         c.settings.limits, keep_cached=publishes)
            # Sent first, so the decompression follows the download as it arrives.
            decompress.apply_async((job_id, layer, target),
                                   {"token": token, "started": started, **self.carried()},
                                   queue=node_cpu_queue(c.node))
            stages.fetch(c.env.client, layer_, c.env.disk, progress_)
            return None

        chain = c.chain(registry)
        publishes = chain.wants_publish(spec, "registry", goal)  # it reads the entry next
        result = chain.materialize(spec, goal=goal, progress=progress, claim=claim)
        if result.uncompressed_size is None:  # the decompress task goes on from here
            return {"digest": str(spec.digest), "staged_on": c.node}
        count_layer(result, goal, started)
        if token:
            c.leases.release(spec.digest, token)
        extra = {"shared_from": str(result.shared_from)} if result.shared_from else {}
        if result.published is not None:
            extra["publish"] = "done"
        elif goal == "disk" and chain.wants_publish(spec, "disk"):
            # The remote tier did not answer: the node has the layer, the shared copy
            # follows when the remote tier is back. The publish carries the followers on.
            extra["publish"] = "pending"
            publish.apply_async((job_id, layer, target), self.carried(),
                                queue=node_io_queue(c.node), countdown=PUBLISH_BACKOFF[0])
        outcome = self.done(job_id, spec, target, result.source or "registry", **extra)
        if extra.get("publish") != "pending":
            self.hand_on(job_id, layer)
        return outcome
    except (LeaseBusy, Retry):
        raise
    except Exception as e:
        self.fail(job_id, layer, target, e, token)
        raise


class _WaitSlots:
    """How many of this process's threads may wait on a busy lease at a time: all but a
    quarter of the IO pool's (none in a pool of one). The quarter goes on with the node's
    own fetches and publishes: a holder releases after its publish, which runs on its
    node's IO queue, so two nodes whose every thread waited on the other's leases would
    stall until their waits ran out. A fetch that finds no slot free goes back in the
    queue for a moment, as every busy fetch used to."""

    def __init__(self) -> None:
        # Sized by `_ready` from the IO pool's own concurrency (the one number that says
        # how many threads there are); before that, and in a process that is not an IO
        # worker, there are none and a busy fetch goes back in the queue.
        self.size(0)

    def size(self, pool_threads: int) -> None:
        self.free = threading.BoundedSemaphore(max(0, pool_threads - max(1, pool_threads // 4)))


WAIT_SLOTS = _WaitSlots()


def _lease_wait(leases: Leases, digest: Digest, until: float) -> bool:
    """Wait (till `until`, monotonic) for a busy lease's release; False: no slot was free,
    or the holder still has it (the fetch then goes back in the queue, as it used to)."""
    slots = WAIT_SLOTS.free
    if not slots.acquire(blocking=False):
        return False
    try:
        return leases.wait_free(digest, until - time.monotonic())
    finally:
        slots.release()


def _skip_cancelled(job_id: str, layer: dict[str, Any], target: str,
                    token: str | None) -> bool:
    """A fetch of a cancelled job does not start: the layer is recorded cancelled and the
    lease a resent fetch carries is given back."""
    books = bookkeeping()
    if not books.jobs.cancelled(job_id, max_age=CANCEL_RECHECK):
        return False
    if token:
        books.leases.release(Digest.parse(layer["digest"]), token)
    books.jobs.update_layer(job_id, layer["digest"], target, state="cancelled")
    return True


@app.task(name="layerwarm.fetch_batch", bind=True, ignore_result=True)
def fetch_batch(self: Task, job_id: str, layers: list[dict[str, Any]],
                target: str) -> dict[str, Any]:
    """Tiny layers of one job and target, each through the fetch task's own code, here.

    A layer whose lease is busy goes on as its own fetch task, which waits for it; a
    layer that failed is already recorded in the job.
    """
    requeued = 0
    for layer in layers:
        try:
            fetch(job_id, layer, target)  # a direct call: runs now, in this task
        except LeaseBusy:
            requeued += 1
            fetch.apply_async((job_id, layer, target), countdown=random.uniform(*LEASE_WAIT),
                              queue=Target.parse(target).fetch_queue)
        except Exception:  # noqa: BLE001 - failed for good; `fetch` recorded it in the job
            continue
    return {"layers": len(layers), "requeued": requeued}


@app.task(name="layerwarm.decompress", bind=True, base=LayerTask, max_retries=None,
          ignore_result=True)
def decompress(self: LayerTask, job_id: str, layer: dict[str, Any], target: str,
               token: str | None = None, started: float | None = None, deferrals: int = 0,
               refetched: bool = False, **_: Any) -> dict[str, Any]:
    """Decompress the blob this host's fetch task is downloading (sent as it starts).

    It follows the download as it arrives and commits once the blob is verified. If the
    fetch failed, its task failed the layer. If the fetch left no blob (gc removed it
    before this ran), the fetch is sent again at once, once. While another layer's blob
    is staged whole on this host, it does not wait on its own download: it goes back in
    the queue behind that one.
    """
    try:
        c = context()
        spec, goal = layer_from_json(layer), goal_of(target)
        disk = c.env.disk
        if deferrals < MAX_DEFERRALS and better_later(spec, disk):
            # Its download is still running and another layer's blob is ready here: that
            # one goes first (it is ahead in this queue); this comes back in a moment. Only
            # so often: a blob left staged by a crash would otherwise keep it going round.
            decompress.apply_async(
                (job_id, layer, target),
                {**(self.request.kwargs or {}), "deferrals": deferrals + 1},
                queue=node_cpu_queue(c.node), countdown=DEFER_SECONDS)
            return {"digest": str(spec.digest), "deferred": deferrals + 1}
        # Quiet start: the fetch already wrote the layer's progress (host, run, lease);
        # most layers decompress in well under the interval, so "decompressing" would be
        # one more write that nobody sees before "done".
        progress = JobProgress(self, c.jobs, job_id, target, c.node, c.run, lease=token,
                               quiet_start=True)
        publishes = c.chain(_no_registry).wants_publish(spec, "registry", goal)
        outcome = decompress_following(spec, disk, progress, c.settings.limits,
                                       keep_cached=publishes)  # the publish reads it next
        if outcome is None:
            return _no_blob(self, job_id, layer, spec, target, token, refetched)
        size, made = outcome
        if made:
            count_layer(LayerResult(spec, "registry", size), goal, started)
            log.info("layer decompressed and cached: %s (%d bytes) %s",
                     spec.digest, size, disk.path(spec.digest))
        if publishes:
            if goal == "disk":  # the node has the layer: its job is done; the shared copy follows
                self.done(job_id, spec, target, "registry", publish="pending")
            publish.apply_async((job_id, layer, target), {"token": token, **self.carried()},
                                queue=node_io_queue(c.node))
            return {"digest": str(spec.digest), "publish_on": c.node}
        if token:
            c.leases.release(spec.digest, token)
        outcome = self.done(job_id, spec, target, "registry")
        self.hand_on(job_id, layer)
        return outcome
    except Retry:
        raise
    except Exception as e:
        self.fail(job_id, layer, target, e, token)
        raise


def _no_blob(task: LayerTask, job_id: str, layer: dict[str, Any], spec: LayerSpec,
             target: str, token: str | None, refetched: bool) -> dict[str, Any]:
    """The decompress found no staged blob: its fetch failed (and failed the layer) or
    ended the job, or gc removed the blob first, when the fetch is sent again, once."""
    c, digest = context(), str(spec.digest)
    state = c.jobs.layer_state(job_id, digest, target)
    if refetched or state in ("failed", "done"):
        log.info("layer %s: the fetch left no blob to decompress", spec.digest)
        return {"digest": digest, "fetch_failed": True}
    log.warning("layer %s: its staged blob is gone; fetching it again", spec.digest)
    fetch.apply_async((job_id, layer, target), {"token": token, **task.carried()},
                      queue=node_io_queue(c.node))
    return {"digest": digest, "refetch": True}


@app.task(name="layerwarm.publish", bind=True, base=LayerTask, max_retries=None,
          ignore_result=True)
def publish(self: LayerTask, job_id: str, layer: dict[str, Any], target: str,
            token: str | None = None, attempt: int = 0, **_: Any) -> dict[str, Any]:
    """The chain's write-back of a layer this host fetched: its entry to the remote tier."""
    try:
        c = context()
        spec, goal = layer_from_json(layer), goal_of(target)
        # A node target's record already says done (decompress wrote it before sending
        # this): progress there would never show, and each write would cost a command.
        progress = JobProgress(self, c.jobs, job_id, target, c.node, c.run, lease=token) \
            if goal == "remote" else NO_PROGRESS
        if token:
            try:
                c.leases.check(spec.digest, token)
            except LeaseLost as e:
                # Another worker may be at it now: not ours to publish. The fetch, sent
                # again, finds the layer in the remote tier, or takes the lease anew.
                log.warning("layer %s: %s; sending its fetch again", spec.digest, e)
                fetch.apply_async((job_id, layer, target), self.carried(),
                                  queue=Target.parse(target).fetch_queue)
                return {"digest": str(spec.digest), "lease_lost": True}
        chain = c.chain(_no_registry)
        published = chain.write_back(spec, "registry", goal=goal, progress=progress)
        if published:
            stats.record(c.env.disk.meta,
                         {stats.PUBLISHED: c.env.disk.size(spec.digest) or 0})
        if token:
            c.leases.release(spec.digest, token)
        if goal == "remote":
            outcome = self.done(job_id, spec, target, "registry", publish="done")
            self.hand_on(job_id, layer)
            return outcome
        if chain.wants_publish(spec, "disk"):
            # A node's layer whose remote tier did not answer: the node is warm; the
            # shared copy is tried again, patiently, for as long as it takes. Its
            # followers do not wait for that: they try the registry themselves, now (the
            # retry carries none, so they are sent once).
            c.jobs.update_layer(job_id, str(spec.digest), target, state="done",
                                publish="pending")
            self.hand_on(job_id, layer)
            low, high = PUBLISH_BACKOFF
            raise self.retry(countdown=min(high, low * 2 ** attempt) * random.uniform(0.5, 1),
                             queue=node_io_queue(c.node), kwargs={"attempt": attempt + 1})
        c.jobs.update_layer(job_id, str(spec.digest), target, state="done", publish="done")
        self.hand_on(job_id, layer)
        return {"digest": str(spec.digest), "published_by": c.node}
    except Retry:
        raise
    except Exception as e:
        self.fail(job_id, layer, target, e, token)
        raise


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
