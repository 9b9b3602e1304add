"""Decompress while the download runs: the two ways the fetch and decompress steps overlap.

    fetch_and_decompress  one process (the embedded runner): the fetch tells a
                          `GrowingFile` of each write and of its verified end
    decompress_following  another process (a Celery CPU worker): a `FollowedFetch`
                          polls the staging file of a fetch running in an IO worker

Both read the blob through a `BlobReader` (pipeline/follow.py) whose end is the blob's
verified end, and commit through `stages.decompress_stream`, so an entry is named only
with the blob's verdict in hand. `better_later` is the CPU queue's one scheduling rule.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, TypeVar

from pipeline.config import Limits
from pipeline.errors import VerificationError
from pipeline.follow import FollowedFetch, GrowingFile, StreamAbandoned, partial_path
from pipeline.indexing import IndexBuild
from pipeline.layer import NO_PROGRESS, FromBlob, HeldProgress, LayerSpec, Progress, paired
from pipeline.stages import (
    DEFAULT_LIMITS,
    SubmitCPU,
    check_disk,
    decompress,
    decompress_stream,
    fetch,
    inflate_verified,
)
from pipeline.tiers.disk import DiskTier

if TYPE_CHECKING:
    from pipeline.registry.client import RegistryClient

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
    submit_cpu: SubmitCPU = on_own_thread,
    limits: Limits = DEFAULT_LIMITS,
    keep_cached: bool = False,
) -> int:
    """Fetch the blob and decompress it into the disk tier, the second following the first.

    The decompression (its inflate on `submit_cpu`, where CPU work belongs; its commit,
    which waits on the disk, off it) reads the staging file as the download writes it, so
    inflating, hashing and writing the entry overlap the transfer. It sees the end of the
    file only once the blob's digest is verified. If the download starts over (a server
    ignoring Range) the decompression is abandoned and runs again from the finished
    staging file. Returns the entry's size. The caller holds the digest's lock.
    `keep_cached`: a publish follows (`stages.decompress_stream`).
    """
    staging = disk.staging_path(layer.digest)
    if staging.exists():  # an earlier fetch finished; only its decompress is left
        staging = fetch(client, layer, disk, progress)
        return decompress(layer, disk, staging, progress, limits, submit_cpu, keep_cached)
    growing, held = GrowingFile(), HeldProgress(progress)
    # On a thread of its own, which mostly waits: for the inflate on `submit_cpu`, then
    # on the commit's fsync.
    following = on_own_thread(
        lambda: decompress_stream(layer, disk, growing.reader(), held, limits, submit_cpu,
                                  keep_cached))
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
            return decompress(layer, disk, staging, progress, limits, submit_cpu, keep_cached)
    finally:
        growing.close()
    staging.unlink(missing_ok=True)
    return size


def _wait_quietly(future: Future[int]) -> None:
    try:
        future.result()
    except BaseException:  # the caller raises the error that caused this one
        pass


def decompress_following(
    layer: LayerSpec,
    disk: DiskTier,
    progress: Progress = NO_PROGRESS,
    limits: Limits = DEFAULT_LIMITS,
    keep_cached: bool = False,
) -> tuple[int, bool] | None:
    """Decompress a blob that a fetch in another process is downloading, as it arrives.

    Called without the digest's lock: the fetch holds it while it runs, and this takes it
    once the fetch is over, to commit (pipeline/follow.py: `FollowedFetch`). Returns the
    entry's size and whether this call made the entry (False: another process did), or
    None when the fetch left no blob (it failed, or its blob is gone). If the file
    followed was not the one the fetch verified, the verified staging blob, if any, is
    decompressed the ordinary way. `keep_cached`: a publish follows
    (`stages.decompress_stream`).
    """
    staging = disk.staging_path(layer.digest)
    held = HeldProgress(progress)
    follower = FollowedFetch(staging, layer.digest, layer.size, disk.lock(layer.digest),
                             held.release)
    try:
        try:
            with disk.space_guard(), disk.ingest(layer.digest, keep_cached=keep_cached) \
                    as ingest:
                index = IndexBuild(layer)
                held.stage(layer, "decompressing", layer.size)
                tar = inflate_verified(layer, follower, ingest.file, held, limits, index,
                                       keep_cached)
                made = not _verified_entry(layer, disk)  # else another process made it
                if made:
                    ingest.commit(layer, tar, FromBlob(follower.verdict()))
                    staging.unlink(missing_ok=True)
            if made:
                index.store(disk)
                return tar.size, True
        except (StreamAbandoned, VerificationError) as e:
            # Judged on bytes the fetch may have replaced: only the verified blob counts.
            log.info("layer %s: following the fetch did not work out (%s)", layer.digest, e)
        finally:
            follower.close()
        follower.wait_for_fetch()  # nothing changes while we decide
        if (size := check_disk(layer, disk)) is not None:
            return size, False
        if staging.exists():
            return decompress(layer, disk, staging, progress, limits,
                              keep_cached=keep_cached), True
        return None
    finally:
        follower.lock.release()


def _verified_entry(layer: LayerSpec, disk: DiskTier) -> bool:
    """Whether the disk holds this layer made from its own verified blob (nothing to do).

    An entry that only shares the content (or was adopted) is replaced by the verified one.
    """
    if not disk.has(layer.digest):
        return False
    row = disk.meta.layer(layer.digest)
    return row is not None and paired(row.origin) and row.diff_id == layer.diff_id


def better_later(layer: LayerSpec, disk: DiskTier) -> bool:
    """Whether a decompression that would follow a download should wait its turn instead.

    True while the layer's download is still running (only its `.partial` file exists) and
    another blob on this disk is already staged whole: the one slot decompressing here
    would otherwise sit waiting on the network while ready work waits on it.
    """
    staging = disk.staging_path(layer.digest)
    if staging.exists() or not partial_path(staging).exists():
        return False
    try:
        names = os.listdir(disk.staging_dir)
    except FileNotFoundError:
        return False
    return any(n != staging.name and not n.endswith(".partial") for n in names)
