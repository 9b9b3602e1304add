"""The three stages of materializing one layer, and the function that composes them.

    fetch       registry blob -> .staging/sha256_<hex>   (digest + size verified while streaming)
    decompress  staging -> sha256_<hex> in the disk tier  (sha256 of output == diff_id)
    publish     disk -> remote tier, with metadata        (skipped when already there)

`pipeline/materialize.py` composes them (disk -> disk by diff_id -> remote -> registry) for
the embedded runner; the Celery tasks call the stages one by one with the same functions.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Literal, Protocol, TypeVar

from pipeline.codecs import CHUNK, Readable, compression_for, iter_decompressed
from pipeline.config import Limits
from pipeline.digest import Digest, Verifier
from pipeline.errors import (
    DigestMismatch,
    LimitExceeded,
    NotFound,
    RemoteTierUnavailable,
    SizeMismatch,
    TransientError,
    VerificationError,
)
from pipeline.follow import FollowedFetch, GrowingFile, StreamAbandoned, partial_path
from pipeline.reference import Reference
from pipeline.registry.client import RegistryClient
from pipeline.sinks import HashingWriter, InlineWriter
from pipeline.tiers.disk import DiskTier
from pipeline.verify import hash_file

if TYPE_CHECKING:  # annotations only: a warm without a remote tier need not load it
    from pipeline.tiers.remote import RemoteTier

log = logging.getLogger("layerwarm")

# "link": satisfied from a disk entry with the same diff_id under another digest (sharing.py)
Source = Literal["disk", "link", "remote", "registry"]
T = TypeVar("T")
FETCH_ATTEMPTS = 5
DEFAULT_LIMITS = Limits()
SMALL_BLOB = 1 << 20  # compressed; below it, hash and write on the decompressing thread


@dataclass(frozen=True)
class LayerSpec:
    """One layer to materialize: what the manifest and image config say about it."""

    digest: Digest                     # of the compressed blob; names the cache entry
    diff_id: Digest                    # of the decompressed tar, from the image config
    media_type: str
    size: int                          # compressed size from the manifest
    sources: tuple[Reference, ...] = field(default=(), compare=False)  # repos that have it


@dataclass
class LayerResult:
    layer: LayerSpec
    source: Source | None = None
    uncompressed_size: int | None = None
    seconds: float = 0.0
    published: bool | None = None      # None: no remote tier, or it was not reachable
    error: str | None = None
    shared_from: Digest | None = None  # source "link": the entry whose content it shares

    @property
    def ok(self) -> bool:
        return self.error is None


class Progress(Protocol):
    """Receives stage changes and byte counts; must be thread-safe."""

    def planned(self, layers: Sequence[LayerSpec]) -> None: ...
    def stage(self, layer: LayerSpec, stage: str, total: int | None) -> None: ...
    def advance(self, layer: LayerSpec, nbytes: int) -> None: ...


class NoProgress:
    def planned(self, layers: Sequence[LayerSpec]) -> None:
        pass

    def stage(self, layer: LayerSpec, stage: str, total: int | None) -> None:
        pass

    def advance(self, layer: LayerSpec, nbytes: int) -> None:
        pass


NO_PROGRESS = NoProgress()


class HeldProgress:
    """Progress of a decompression that follows a download: held back until it ends.

    Both stages of one layer run at once there, and a bar (or a job record) shows one
    stage at a time: the fetch's until `release()`, then the decompression's.
    """

    def __init__(self, progress: Progress) -> None:
        self._progress, self._lock = progress, threading.Lock()
        self._released, self._held = False, 0
        self._stage: tuple[LayerSpec, str, int | None] | None = None

    def planned(self, layers: Sequence[LayerSpec]) -> None:
        self._progress.planned(layers)

    def stage(self, layer: LayerSpec, stage: str, total: int | None) -> None:
        with self._lock:
            if self._released:
                self._progress.stage(layer, stage, total)
            else:
                self._stage = (layer, stage, total)

    def advance(self, layer: LayerSpec, nbytes: int) -> None:
        with self._lock:
            if self._released:
                self._progress.advance(layer, nbytes)
            else:
                self._held += nbytes

    def release(self) -> None:
        with self._lock:
            self._released = True
            if self._stage is not None:
                self._progress.stage(*self._stage)
                if self._held:
                    self._progress.advance(self._stage[0], self._held)


def remote_metadata(layer: LayerSpec, uncompressed_size: int) -> dict[str, str]:
    return {
        "diff-id": str(layer.diff_id),
        "media-type": layer.media_type,
        "compressed-size": str(layer.size),
        "uncompressed-size": str(uncompressed_size),
    }


def fetch(
    client: RegistryClient,
    layer: LayerSpec,
    disk: DiskTier,
    progress: Progress = NO_PROGRESS,
    growing: GrowingFile | None = None,
) -> Path:
    """Download the layer blob to its staging file, verified; return the staging path.

    A cut connection resumes with a Range request from the bytes already verified, and a
    `.partial` file left by a crashed process is resumed rather than downloaded again.
    The caller holds the digest's lock, so no one else writes these files meanwhile.
    `growing`, if given, hears of every write, so a reader can follow the download.
    """
    try:
        return _fetch(client, layer, disk, progress, growing)
    except BaseException:
        if growing is not None:
            growing.fail()
        raise


def _fetch(
    client: RegistryClient,
    layer: LayerSpec,
    disk: DiskTier,
    progress: Progress,
    growing: GrowingFile | None,
) -> Path:
    staging = disk.staging_path(layer.digest)
    if _staging_verified(staging, layer):
        return staging  # an earlier fetch whose decompress did not run
    partial = partial_path(staging)
    progress.stage(layer, "fetching", layer.size)
    last: Exception | None = None
    for source in layer.sources:
        try:
            with disk.space_guard():
                resumed = partial.exists()
                try:
                    _download(client, source, layer, partial, progress, growing)
                except VerificationError:
                    if not resumed:
                        raise
                    # The kept prefix may be what was wrong: one clean try before failing.
                    log.warning("blob %s: resumed download did not verify; starting over",
                                layer.digest)
                    partial.unlink()
                    progress.stage(layer, "fetching", layer.size)
                    _download(client, source, layer, partial, progress, growing)
            os.replace(partial, staging)
            if growing is not None:
                growing.finish()
            return staging
        except NotFound as e:  # another repository holding the same blob may serve it
            last = e
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
    partial.unlink(missing_ok=True)
    raise last or NotFound(f"blob {layer.digest}: no repository to fetch it from")


def _staging_verified(staging: Path, layer: LayerSpec) -> bool:
    """Whether a staging file left by an earlier fetch holds exactly the blob.

    Staging files are not fsynced (the entry made from them is), so after a power cut one
    can have the right size and the wrong bytes: hash it again rather than trust its size.
    """
    try:
        if staging.stat().st_size != layer.size:
            return False
        hash_file(staging, layer.digest, layer.size, "staged layer blob")
        return True
    except FileNotFoundError:
        return False
    except VerificationError:
        log.warning("staged blob %s does not verify: fetching it again", staging)
        staging.unlink(missing_ok=True)
        return False


def _resume_point(out: BinaryIO, verifier: Verifier) -> None:
    """Hash what an earlier attempt left in `out`; drop it if it cannot be a prefix."""
    try:
        while chunk := out.read(CHUNK):
            verifier.update(chunk)
    except SizeMismatch:  # longer than the blob: not ours to keep
        out.seek(0)
        out.truncate()
        verifier.reset()


def _write_all(out: BinaryIO, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[out.write(view) or 0:]


def _download(
    client: RegistryClient,
    ref: Reference,
    layer: LayerSpec,
    dest: Path,
    progress: Progress,
    growing: GrowingFile | None,
) -> None:
    verifier = Verifier(layer.digest, size=layer.size, what="layer blob")
    resuming = dest.exists()
    # Readable (a follower preads a duplicate of this descriptor) and unbuffered (each
    # chunk must be in the file when `growing.wrote` says so). Chunks are 1 MiB anyway.
    with open(dest, "r+b" if resuming else "w+b", buffering=0) as out:
        if resuming:
            _resume_point(out, verifier)
        if growing is not None:
            growing.attach(out.fileno(), verifier.count)
        if verifier.count:
            log.info("blob %s: resuming at byte %d", layer.digest, verifier.count)
            progress.advance(layer, verifier.count)
        for attempt in range(FETCH_ATTEMPTS):
            try:
                if verifier.count == layer.size:
                    break
                with client.open_blob(ref, layer.digest, offset=verifier.count) as stream:
                    if stream.offset != verifier.count:  # server ignored Range: start over
                        progress.advance(layer, -verifier.count)
                        out.seek(0)
                        out.truncate()
                        verifier.reset()
                        if growing is not None:
                            growing.attach(out.fileno(), 0)
                    for chunk in stream.iter_chunks(CHUNK):
                        verifier.update(chunk)
                        _write_all(out, chunk)
                        if growing is not None:
                            growing.wrote(len(chunk))
                        progress.advance(layer, len(chunk))
                break
            except TransientError as e:
                if attempt + 1 == FETCH_ATTEMPTS:
                    raise
                log.warning("blob %s: %s; resuming at byte %d", layer.digest, e, verifier.count)
                time.sleep(min(0.5 * 2**attempt, 8.0) if e.retry_after is None else e.retry_after)
        verifier.verify()  # no fsync: a staging file is hashed again before reuse


def decompress(
    layer: LayerSpec,
    disk: DiskTier,
    staging: Path,
    progress: Progress = NO_PROGRESS,
    limits: Limits = DEFAULT_LIMITS,
) -> int:
    """Decompress the staging blob into the disk tier, verified against the diff_id.

    Returns the uncompressed size. The staging file is removed once the entry exists, or
    when its content can never become one (wrong diff_id, a bomb).
    """
    with open(staging, "rb") as src:
        try:
            size = decompress_stream(layer, disk, src, progress, limits)
        except VerificationError:
            staging.unlink(missing_ok=True)
            raise
    staging.unlink(missing_ok=True)
    return size


def decompress_stream(
    layer: LayerSpec,
    disk: DiskTier,
    src: Readable,
    progress: Progress = NO_PROGRESS,
    limits: Limits = DEFAULT_LIMITS,
) -> int:
    """Decompress the blob read from `src` into the disk tier, verified; the entry's size.

    `src` must end only after the blob's own digest is verified: the entry is named as soon
    as the output matches the diff_id.
    """
    progress.stage(layer, "decompressing", layer.size)
    with disk.space_guard(), disk.ingest(layer.digest) as ingest:
        size = inflate_verified(layer, src, ingest.file, progress, limits)
        ingest.commit()
    _record(layer, disk, size)
    return size


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


def decompress_following(
    layer: LayerSpec,
    disk: DiskTier,
    progress: Progress = NO_PROGRESS,
    limits: Limits = DEFAULT_LIMITS,
) -> tuple[int, bool] | None:
    """Decompress a blob that a fetch in another process is downloading, as it arrives.

    Called without the digest's lock: the fetch holds it while it runs, and this takes it
    once the fetch is over, to commit (pipeline/follow.py: `FollowedFetch`). Returns the
    entry's size and whether this call made the entry (False: another process did), or
    None when the fetch left no blob (it failed: its own task retries or fails the layer).
    If the file followed was not the one the fetch verified, the verified staging blob, if
    any, is decompressed the ordinary way.
    """
    staging = disk.staging_path(layer.digest)
    held = HeldProgress(progress)
    follower = FollowedFetch(staging, layer.size, disk.lock(layer.digest), held.release)
    try:
        try:
            with disk.space_guard(), disk.ingest(layer.digest) as ingest:
                held.stage(layer, "decompressing", layer.size)
                size = inflate_verified(layer, follower, ingest.file, held, limits)
                if follower.read(1):  # returns b"" only at the verified end, the lock held
                    raise StreamAbandoned(f"layer {layer.digest}: data after the stream's end")
                if not disk.has(layer.digest):
                    ingest.commit()
                    staging.unlink(missing_ok=True)
                    _record(layer, disk, size)
                    return size, True
        except (StreamAbandoned, VerificationError) as e:
            # Judged on bytes the fetch may have replaced: only the verified blob counts.
            log.info("layer %s: following the fetch did not work out (%s)", layer.digest, e)
        finally:
            follower.close()
        follower.wait_for_fetch()  # nothing changes while we decide
        if (size := check_disk(layer, disk)) is not None:
            return size, False
        if staging.exists():
            return decompress(layer, disk, staging, progress, limits), True
        return None
    finally:
        follower.lock.release()


def inflate_verified(
    layer: LayerSpec,
    src: Readable,
    out: BinaryIO,
    progress: Progress = NO_PROGRESS,
    limits: Limits = DEFAULT_LIMITS,
) -> int:
    """Decompress `src` into `out` within the limits, verifying the diff_id; the size.

    Inflating, hashing and writing run on three threads (pipeline/sinks.py), except for a
    blob of at most 1 MiB, where starting the threads would cost more than the work.
    """
    compression = compression_for(layer.media_type)
    verifier = Verifier(layer.diff_id, what=f"layer {layer.digest} decompressed content")
    counting = _Counting(src, layer, progress)
    sink_type = HashingWriter if layer.size > SMALL_BLOB else InlineWriter
    sink, produced = sink_type(out, verifier), 0
    try:
        try:
            for chunk in iter_decompressed(counting, compression, f"layer {layer.digest}"):
                produced += len(chunk)
                _check_limits(layer, produced, counting.count, limits)
                sink.put(chunk)
        finally:
            sink.close()
        verifier.verify()
    except (DigestMismatch, SizeMismatch):
        raise VerificationError(
            f"layer {layer.digest}: decompressed content is {verifier.actual}, "
            f"but the image config says diff_id {layer.diff_id}"
        ) from None
    return verifier.count


def _record(layer: LayerSpec, disk: DiskTier, size: int) -> None:
    # The entry is verified and named; a metadata hiccup must not turn that into a failure.
    try:
        disk.meta.record_layer(layer.digest, layer.diff_id, layer.media_type, layer.size, size)
    except sqlite3.Error as e:
        log.warning("could not record %s in %s: %s", layer.digest, disk.meta.path, e)


def check_disk(layer: LayerSpec, disk: DiskTier, *, touch: bool = True) -> int | None:
    """The entry's size if the disk tier has it as recorded; else None (a miss).

    An entry whose size differs from its row (truncated by hand, a bad disk), or that has no
    row and does not hash to the diff_id, is removed here, so the caller fetches it again.
    The caller holds the digest's lock. `touch=False` leaves marking a hit as used to the
    caller (the embedded runner marks a whole warm's hits at once).
    """
    size = disk.size(layer.digest)
    if size is None:
        return None
    row = disk.meta.layer(layer.digest)
    if row is not None and row.uncompressed_size != size:
        log.warning("disk entry %s has %d bytes, %d recorded: fetching it again",
                    disk.path(layer.digest), size, row.uncompressed_size)
        disk.remove(layer.digest)
        return None
    if row is None:
        # No row (a crash between naming and recording, or a file put there by hand): a
        # name alone is no proof, so hash it before adopting it as this layer.
        try:
            hash_file(disk.path(layer.digest), layer.diff_id, None,
                      f"disk entry {disk.path(layer.digest)}")
        except VerificationError as e:
            log.warning("%s; fetching it again", e)
            disk.remove(layer.digest)
            return None
        _record(layer, disk, size)
    elif touch:
        disk.meta.touch(layer.digest)
    return size


def _check_limits(layer: LayerSpec, out: int, read: int, limits: Limits) -> None:
    if out > limits.max_layer_bytes:
        raise LimitExceeded(
            f"layer {layer.digest}: decompresses to more than {limits.max_layer_bytes} bytes "
            "(LAYERWARM_MAX_LAYER_BYTES)"
        )
    if out > limits.ratio_floor and out > limits.max_ratio * max(read, 1):
        raise LimitExceeded(
            f"layer {layer.digest}: expands more than {limits.max_ratio}:1 "
            "(LAYERWARM_MAX_RATIO); refusing a likely decompression bomb"
        )


class _Counting:
    """Reports compressed bytes read, so decompression shows progress against `size`."""

    def __init__(self, src: Readable, layer: LayerSpec, progress: Progress) -> None:
        self._src, self._layer, self._progress = src, layer, progress
        self.count = 0

    def read(self, n: int = -1) -> bytes:
        data = self._src.read(n)
        self.count += len(data)
        self._progress.advance(self._layer, len(data))
        return data


def restore(
    layer: LayerSpec, disk: DiskTier, remote: RemoteTier, progress: Progress = NO_PROGRESS
) -> int | None:
    """Copy the layer from the remote tier to disk, verified; None when the remote lacks it."""
    entry = remote.stat(layer.digest)
    if entry is None:
        return None
    progress.stage(layer, "restoring", entry.size)
    with disk.ingest(layer.digest) as ingest:
        ingest.file.close()
        remote.download(layer.digest, ingest.path, lambda n: progress.advance(layer, n))
        what = f"remote entry {remote.url}/{layer.digest.cache_name}"
        verifier = Verifier(layer.diff_id, what=what)
        with open(ingest.path, "rb") as f:
            while chunk := f.read(CHUNK):
                verifier.update(chunk)
        verifier.verify()
        ingest.commit()
    _record(layer, disk, verifier.count)
    return verifier.count


def publish(
    layer: LayerSpec,
    disk: DiskTier,
    remote: RemoteTier,
    progress: Progress = NO_PROGRESS,
    *,
    force: bool = False,
) -> bool:
    """Upload the disk entry to the remote tier unless it is there already; True if uploaded."""
    path = disk.path(layer.digest)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return _evicted_before_publish(layer)
    if not force:
        try:
            entry = remote.stat(layer.digest)
        except RemoteTierUnavailable:
            disk.meta.set_publish_pending(layer.digest, True)
            raise
        if entry is not None and entry.size == size:
            disk.meta.set_publish_pending(layer.digest, False)
            return False
    progress.stage(layer, "publishing", size)
    try:
        remote.upload(
            layer.digest, path, remote_metadata(layer, size), lambda n: progress.advance(layer, n)
        )
    except RemoteTierUnavailable:
        disk.meta.set_publish_pending(layer.digest, True)
        raise
    except FileNotFoundError:
        if path.exists():
            raise
        return _evicted_before_publish(layer)
    disk.meta.set_publish_pending(layer.digest, False)
    log.info("layer published to remote: %s (%d bytes) %s", layer.digest, size, remote.url)
    return True


def _evicted_before_publish(layer: LayerSpec) -> bool:
    # gc may evict between materializing and publishing (no lock is held meanwhile):
    # nothing is left to publish; whoever needs the layer next fetches it again.
    log.warning("layer %s left the disk tier before it was published", layer.digest)
    return False
