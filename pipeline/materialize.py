"""Make one layer present on disk (and in the remote tier): the stages, composed.

`materialize` looks disk -> disk by diff_id (a hard link, sharing.py) -> remote -> registry
under the digest's host lock, so two processes on one host fetch a layer once. It is the
composition the embedded runner uses; there decompression follows the download as it
arrives (`fetch_and_decompress`, pipeline/follow.py) instead of waiting for it. The Celery
tasks call the stages in pipeline/stages.py one by one instead.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from contextlib import ExitStack
from typing import TYPE_CHECKING, TypeVar

from pipeline import sharing
from pipeline.codecs import compression_for
from pipeline.config import Limits
from pipeline.errors import NotFound, RemoteTierUnavailable, VerificationError
from pipeline.follow import GrowingFile, StreamAbandoned
from pipeline.registry.client import RegistryClient
from pipeline.stages import (
    DEFAULT_LIMITS,
    NO_PROGRESS,
    HeldProgress,
    LayerResult,
    LayerSpec,
    Progress,
    check_disk,
    decompress,
    decompress_stream,
    fetch,
    publish,
    restore,
)
from pipeline.tiers.disk import DiskTier

if TYPE_CHECKING:  # annotations only: a warm without a remote tier need not load it
    from pipeline.tiers.remote import RemoteTier

log = logging.getLogger("layerwarm")
T = TypeVar("T")


def on_own_thread(fn: Callable[[], T]) -> Future[T]:
    """Run `fn` on a thread of its own; the default place for CPU work outside a pool."""
    future: Future[T] = Future()

    def run() -> None:
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(fn())
            except BaseException as e:  # handed to whoever waits on the future
                future.set_exception(e)

    threading.Thread(target=run, name="layerwarm-cpu", daemon=True).start()
    return future


def fetch_and_decompress(
    client: RegistryClient,
    layer: LayerSpec,
    disk: DiskTier,
    progress: Progress = NO_PROGRESS,
    submit_cpu: Callable[[Callable[[], int]], Future[int]] = on_own_thread,
    limits: Limits = DEFAULT_LIMITS,
) -> int:
    """Fetch the blob and decompress it into the disk tier, the second following the first.

    The decompression (on `submit_cpu`, where CPU work belongs) reads the staging file as
    the download writes it, so inflating, hashing and writing the entry overlap the
    transfer. It sees the end of the file only once the blob's digest is verified. If the
    download starts over (a server ignoring Range) the decompression is abandoned and runs
    again from the finished staging file. Returns the entry's size.
    """
    staging = disk.staging_path(layer.digest)
    if staging.exists():  # an earlier fetch finished; only its decompress is left
        staging = fetch(client, layer, disk, progress)
        return submit_cpu(lambda: decompress(layer, disk, staging, progress, limits)).result()
    growing, held = GrowingFile(), HeldProgress(progress)
    following = submit_cpu(
        lambda: decompress_stream(layer, disk, growing.reader(), held, limits))
    try:
        try:
            staging = fetch(client, layer, disk, progress, growing)
        except BaseException:
            _wait_quietly(following)  # it stops at once: fetch marked the file failed
            raise
        held.release()
        try:
            size = following.result()
        except (StreamAbandoned, VerificationError) as e:
            # An error about bytes the download later replaced says nothing about the blob.
            if isinstance(e, VerificationError) and not growing.restarted:
                staging.unlink(missing_ok=True)  # its content can never become an entry
                raise
            log.info("layer %s: download started over; decompressing the staged blob",
                     layer.digest)
            return submit_cpu(
                lambda: decompress(layer, disk, staging, progress, limits)).result()
    finally:
        growing.close()
    staging.unlink(missing_ok=True)
    return size


def _wait_quietly(future: Future[int]) -> None:
    try:
        future.result()
    except BaseException:  # the caller raises the error that caused this one
        pass


def recorded_hit(
    layer: LayerSpec, disk: DiskTier, remote: RemoteTier | None = None,
    progress: Progress = NO_PROGRESS,
) -> LayerResult | None:
    """The layer as a disk hit that needs nothing more, or None: ask `materialize`.

    A hit here is an entry with the size its row records and no publish pending. It is
    checked without the digest's lock, which guards materializing, not reading: an entry
    is named only once complete. Anything else (no entry, no row, a size that differs, a
    publish still owed to the remote tier) goes through `materialize`, under the lock.
    A warm of cached images then needs no thread per layer.
    """
    size = disk.size(layer.digest)
    if size is None:
        return None
    row = disk.meta.layer(layer.digest)
    if row is None or row.uncompressed_size != size or (remote is not None and row.publish_pending):
        return None
    log.info("disk cache hit: %s (%d bytes) %s", layer.digest, size, disk.path(layer.digest))
    progress.stage(layer, "done", None)
    return LayerResult(layer, source="disk", uncompressed_size=size)


def materialize(
    layer: LayerSpec,
    *,
    client: RegistryClient,
    disk: DiskTier,
    remote: RemoteTier | None = None,
    progress: Progress = NO_PROGRESS,
    submit_cpu: Callable[[Callable[[], int]], Future[int]] = on_own_thread,
    limits: Limits = DEFAULT_LIMITS,
) -> LayerResult:
    """Make the layer present on disk (and remote): disk -> remote -> registry.

    `submit_cpu` runs decompression where CPU work belongs (the runner's CPU pool). A disk
    hit is not marked used here: the caller does that (the runner, a whole warm at once).
    Raises LayerwarmError subclasses; the caller records them per layer.
    """
    started = time.monotonic()
    compression_for(layer.media_type)  # fail before any download for a type we can't unpack
    result = LayerResult(layer)
    remote_ok = remote is not None
    republish = False
    with disk.lock(layer.digest), ExitStack() as content:
        size = check_disk(layer, disk, touch=False)  # the runner marks a warm's hits at once
        if size is not None:
            path = disk.path(layer.digest)
            log.info("disk cache hit: %s (%d bytes) %s", layer.digest, size, path)
            result.source, result.uncompressed_size = "disk", size
            # A disk hit touches nothing remote, unless an earlier publish could not run
            # (its row says so; read only when there is a remote tier to publish to).
            pending = remote is not None and (
                (row := disk.meta.layer(layer.digest)) is not None and row.publish_pending)
            if not pending:
                result.seconds = time.monotonic() - started
                progress.stage(layer, "done", None)
                return result
        if size is None:  # one materialization per diff_id at a time: the next one links
            content.enter_context(sharing.content_lock(disk, layer.diff_id))
        if size is None and (shared := sharing.share(layer, disk)) is not None:
            result.source, result.uncompressed_size = "link", shared.size
            result.shared_from, size = shared.source, shared.size  # published below, as usual
        if remote is not None and size is None:
            try:
                size = restore(layer, disk, remote, progress)
            except RemoteTierUnavailable as e:
                log.warning("remote tier unavailable, using the registry: %s", e)
                remote_ok = False
            except VerificationError as e:
                log.warning("remote entry is corrupt, using the registry: %s", e)
                republish = True
            except NotFound:
                size = None  # removed between stat and download (remote gc): a miss
            if size is not None:
                path = disk.path(layer.digest)
                log.info("remote cache hit: %s (%d bytes) %s", layer.digest, size, path)
                result.source, result.uncompressed_size = "remote", size
                result.seconds = time.monotonic() - started
                progress.stage(layer, "done", None)
                return result
        if size is None:
            log.info("fetching layer from registry: %s (%d bytes)", layer.digest, layer.size)
            size = fetch_and_decompress(client, layer, disk, progress, submit_cpu, limits)
            log.info(
                "layer decompressed and cached: %s (%d bytes) %s",
                layer.digest, size, disk.path(layer.digest),
            )
            result.source, result.uncompressed_size = "registry", size
    if remote is not None and remote_ok:
        try:
            result.published = publish(layer, disk, remote, progress, force=republish)
        except RemoteTierUnavailable as e:
            # The layer is warm on this host; the shared tier catches up on a later run.
            log.warning("publish to remote tier failed, layer stays on disk: %s", e)
    elif remote is not None:
        disk.meta.set_publish_pending(layer.digest, True)
    result.seconds = time.monotonic() - started
    progress.stage(layer, "done", None)
    return result
