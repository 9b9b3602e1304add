"""The embedded runner: every stage in-process, on two bounded thread pools.

Fetch and publish are network-bound and run on the IO pool (many threads); decompress is
CPU-bound and runs on the CPU pool (about one thread per core; zlib, zstd and hashlib
release the GIL). Each unique layer is materialized once however many refs share it.
"""

from __future__ import annotations

import functools
import logging
import sqlite3
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from pipeline import stats
from pipeline.chain import Chain, RegistryStep, quick_hit
from pipeline.config import MAX_INDEX_CHILDREN, Limits, Settings
from pipeline.digest import Digest
from pipeline.errors import (
    LayerwarmError,
    NotFound,
    RemoteTierUnavailable,
    Unauthorized,
    UsageError,
    describe_error,
    layer_reason,
)
from pipeline.following import fetch_and_decompress
from pipeline.layer import NO_PROGRESS, LayerResult, LayerSpec, Progress, Source
from pipeline.manifest import Platform
from pipeline.plan import Plan, ResolvedImage, Resolver, remember, resolve_all
from pipeline.ratelimit import LocalRateLimiter, RateLimiter
from pipeline.reference import Reference
from pipeline.stages import DEFAULT_LIMITS
from pipeline.tiers.disk import DiskTier

if TYPE_CHECKING:  # annotations only: a warm without a remote tier need not load it
    from pipeline.registry.client import RegistryClient
    from pipeline.tiers.remote import RemoteTier

log = logging.getLogger("layerwarm")


@dataclass
class WarmReport:
    plan: Plan
    results: list[LayerResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.plan.failures and all(r.ok for r in self.results)

    def bytes_from(self, source: Source) -> int:
        if source == "registry":
            return sum(r.layer.size for r in self.results if r.source == "registry")
        return sum(r.uncompressed_size or 0 for r in self.results if r.source == source)


@dataclass
class Environment:
    """The collaborators a run needs, built once from Settings. The registry client is
    made on first use: reading an image the cache holds never loads the HTTP stack."""

    make_client: Callable[[], RegistryClient]
    disk: DiskTier
    remote: RemoteTier | None
    max_index_children: int = MAX_INDEX_CHILDREN
    max_stored_config: int = Settings.max_stored_config
    limits: Limits = DEFAULT_LIMITS  # what a layer may expand to, from any source

    @functools.cached_property
    def client(self) -> RegistryClient:
        return self.make_client()

    @classmethod
    def from_settings(
        cls, settings: Settings, rate_limiter: RateLimiter | None = None, *,
        read_only: bool = False,
    ) -> Environment:
        """`rate_limiter` defaults to an in-process budget when LAYERWARM_REGISTRY_RATE is set;
        `read_only`: the disk tier's `.meta.db` is only read (never repaired or written)."""
        if rate_limiter is None and settings.registry_rate:
            rate_limiter = LocalRateLimiter(settings.registry_rate)

        def client() -> RegistryClient:
            from pipeline.registry.client import RegistryClient
            from pipeline.registry.credentials import CredentialSources

            return RegistryClient(
                insecure_registries=settings.insecure_registries,
                retry=settings.retry,
                docker_config=CredentialSources.load(authfile=settings.authfile),
                rate_limiter=rate_limiter,
            )

        remote = None
        if settings.remote_url:
            from pipeline.tiers.remote import open_remote

            remote = open_remote(settings.remote_url)
        return cls(client, DiskTier(settings.cache_dir, read_only=read_only), remote,
                   settings.max_index_children, settings.max_stored_config, settings.limits)

    def resolver(self, *, keep_configs: bool = False) -> Resolver:
        """Resolves refs with this client; `keep_configs`: image configs are read from and
        kept in the disk tier's metadata."""
        return Resolver(self.client, self.disk.meta if keep_configs else None,
                        max_stored=self.max_stored_config, max_children=self.max_index_children)

    def chain(self, registry: RegistryStep | None = None) -> Chain:
        """The lookup chain over this environment's tiers; `registry` ends it (default: fetch
        and decompress here, on a thread of their own)."""
        if registry is None:
            def registry(layer: LayerSpec, progress: Progress) -> int:
                return fetch_and_decompress(
                    self.client, layer, self.disk, progress, limits=self.limits,
                    keep_cached=chain.wants_publish(layer, "registry"))
        chain = Chain(self.disk, self.remote, registry, self.limits)
        return chain


def warm(
    refs: Sequence[Reference],
    settings: Settings,
    *,
    platform: Platform | None,
    progress: Progress = NO_PROGRESS,
    env: Environment | None = None,
) -> WarmReport:
    """Resolve `refs` and materialize every unique layer; never raises for a single layer."""
    env = env or Environment.from_settings(settings)
    refused = _refused_remote(env)  # said once, before any layer work
    with (
        ThreadPoolExecutor(settings.io_threads, thread_name_prefix="layerwarm-io") as io,
        ThreadPoolExecutor(settings.cpu_threads, thread_name_prefix="layerwarm-cpu") as cpu,
    ):
        def registry(layer: LayerSpec, progress: Progress) -> int:
            # Its publish reads the entry next: left in the page cache until then.
            return fetch_and_decompress(env.client, layer, env.disk, progress, cpu.submit,
                                        settings.limits, chain.wants_publish(layer, "registry"))

        chain = env.chain(registry)

        def failed(layer: LayerSpec, e: Exception) -> LayerResult:
            reason = describe_error(e)
            if not isinstance(e, LayerwarmError | OSError):
                log.error("layer %s failed unexpectedly", layer.digest, exc_info=e)
            log.error("layer failed: %s: %s", layer.digest, layer_reason(layer.digest, reason))
            progress.stage(layer, "failed", None)
            return LayerResult(layer, error=reason)

        def one(layer: LayerSpec, *, early: bool = False) -> LayerResult | Exception:
            """The layer materialized, or its failure; `early` (started before every ref
            resolved): the error, not yet reported, as the whole plan may describe the
            layer otherwise (`_as_planned`)."""
            try:
                return quick_hit(layer, chain, progress) or chain.materialize(
                    layer, progress=progress)
            except Exception as e:  # one layer's failure must not stop the others
                return e if early else failed(layer, e)

        starts = _EarlyStarts(lambda layer: io.submit(one, layer, early=True))
        plan = resolve_all(env.resolver(keep_configs=True), list(refs), platform, io,
                           on_image=starts.start)
        progress.planned(plan.layers)
        results = [_as_planned(layer, *starts.outcome(layer), one, failed)
                   for layer in plan.layers]
    # One transaction for the whole warm: a write per layer from many threads at once
    # queued on SQLite's write lock (and its busy-wait sleeps) more than it counted.
    stats.record(env.disk.meta, stats.total(
        [stats.result_counts(r, has_remote=env.remote is not None) for r in results]))
    for r in results if refused else ():  # owed to it, as after an unreachable one
        if r.ok and r.source == "registry":
            env.disk.meta.set_publish_pending(r.layer.digest, True)
    env.disk.meta.touch(*(r.layer.digest for r in results if r.source == "disk"))
    _record_images(plan, env.disk, platform)
    _auto_gc(plan, env.disk, settings)
    return WarmReport(plan, results)


class _EarlyStarts:
    """Starts each unique layer as soon as the first image that lists it resolves, while
    the other refs still resolve: a fleet's first blobs are on the wire before its last
    manifests arrive (resolving 12 images took ~0.07 s of a 2 s cold warm; 10,000 refs
    take seconds)."""

    def __init__(self, submit: Callable[[LayerSpec], Future[LayerResult | Exception]]) -> None:
        self._submit = submit
        self._lock = threading.Lock()
        self._started: dict[Digest, tuple[LayerSpec, Future[LayerResult | Exception]]] = {}

    def start(self, image: ResolvedImage) -> None:
        """Called as each image resolves (on the resolving thread)."""
        for layer in image.layers:
            with self._lock:
                if layer.digest not in self._started:
                    self._started[layer.digest] = (layer, self._submit(layer))

    def outcome(self, layer: LayerSpec) -> tuple[LayerSpec, LayerResult | Exception]:
        """The layer as it was started (with the sources and diff_id of the image that
        started it) and how that went."""
        started, future = self._started[layer.digest]
        return started, future.result()


def _as_planned(
    layer: LayerSpec, started: LayerSpec, outcome: LayerResult | Exception,
    again: Callable[[LayerSpec], LayerResult | Exception],
    failed: Callable[[LayerSpec, Exception], LayerResult],
) -> LayerResult:
    """The result for `layer` as the whole plan describes it (its first image's diff_id,
    every repository that lists it), from how its early start went (`started`: the
    description of the image that resolved first). Done again when it was verified
    against another diff_id than the plan's, when it failed and the plan describes the
    layer otherwise, or when its repositories lacked the blob and the plan names more
    (a fetch moves on to the next repository only on a 404: stages.fetch)."""
    more_sources = len(layer.sources) > len(started.sources)
    if started.diff_id != layer.diff_id or (isinstance(outcome, Exception) and (
            started != layer or (isinstance(outcome, NotFound) and more_sources))):
        outcome = again(layer)
    if isinstance(outcome, Exception):
        return failed(layer, outcome)
    return outcome if outcome.layer is layer else replace(outcome, layer=layer)


def _refused_remote(env: Environment) -> bool:
    """A remote tier that refuses us outright (no such bucket, credentials refused): said
    once, then treated as down for this run, as an unreachable one is (docs/CACHE.md):
    layers come from the registry and their publish stays pending. Without this check
    every layer failed on it, with an ERROR and an `error:` line each."""
    if env.remote is None:
        return False
    try:
        env.remote.connect()
    except (UsageError, Unauthorized) as e:
        log.warning("%s: warming from the registry only; publishes wait until it is fixed",
                    describe_error(e))
        env.remote = None
        return True
    except RemoteTierUnavailable:
        pass  # unreachable for now: each layer tries it, and says so (chain.py)
    return False


def _auto_gc(plan: Plan, disk: DiskTier, settings: Settings) -> None:
    """The automatic quota (LAYERWARM_MAX_CACHE_SIZE), sparing what this warm materialized."""
    if settings.max_cache_size is None:
        return  # no quota: not even the import
    from pipeline.gc import auto_collect

    try:
        auto_collect(disk, settings, protect={x.digest for x in plan.layers})
    except (LayerwarmError, OSError, sqlite3.Error) as e:  # the warm itself succeeded
        log.warning("automatic gc of %s failed: %s", disk.root, describe_error(e))


def _record_images(plan: Plan, disk: DiskTier, platform: Platform | None) -> None:
    """Which image uses which layer, for `usage` and gc, and what each ref resolved to,
    for reading it later without a registry; a failure here fails no warm."""
    if not disk.root.is_dir():
        return
    try:
        disk.meta.record_images([
            (x.manifest_digest, str(x.ref), str(x.platform) if x.platform else None,
             [y.digest for y in x.layers])
            for x in plan.images
        ])
        per_ref = Counter(str(x.ref) for x in plan.images)
        # A ref warmed for every platform it has answers no one-platform question.
        remember(disk.meta, [(x.ref, platform, x) for x in plan.images
                             if per_ref[str(x.ref)] == 1])
    except sqlite3.Error as e:
        log.warning("could not record images in %s: %s", disk.meta.path, e)


def plan_only(
    refs: Sequence[Reference], settings: Settings, *, platform: Platform | None,
    env: Environment | None = None,
) -> tuple[Plan, dict[LayerSpec, Source | None]]:
    """Resolve refs and report what each tier holds; makes no changes."""
    env = env or Environment.from_settings(settings, read_only=True)
    with ThreadPoolExecutor(settings.io_threads, thread_name_prefix="layerwarm-io") as io:
        plan = resolve_all(env.resolver(), list(refs), platform, io)
    return plan, env.chain().locate(plan.layers)
