"""The steps of materializing one layer; pipeline/chain.py puts them in order.

    fetch       registry blob -> .staging/sha256_<hex>   (digest + size verified while streaming)
    decompress  a verified blob -> sha256_<hex> on disk  (the tar's sha256 == diff_id)
    restore     remote tier -> sha256_<hex> on disk      (its metadata, free space, content checked)
    publish     disk -> remote tier, with metadata       (only entries whose blob was verified)
    check_disk  whether the disk entry is what the requesting image wants

Every entry is named by `Ingest.commit`, which refuses bytes without their proofs: the
tar's `Verified` digest and the blob's (pipeline/tiers/disk.py). Decompression reads its
blob to the very end, so the blob's verdict covers every byte, even after the stream.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from pipeline.codecs import CHUNK, Readable, compression_for, iter_decompressed
from pipeline.config import Limits
from pipeline.digest import Verified, Verifier, hash_file
from pipeline.errors import (
    DigestMismatch,
    LimitExceeded,
    NotAFile,
    NotFound,
    RemoteTierUnavailable,
    SizeMismatch,
    TransientError,
    VerificationError,
)
from pipeline.follow import BlobReader, GrowingFile, VerifyingReader, partial_path
from pipeline.indexing import IndexBuild, publish_index
from pipeline.layer import (
    NO_PROGRESS,
    FromBlob,
    FromRemote,
    LayerSpec,
    Progress,
    paired,
    remote_metadata,
    remote_mismatch,
)
from pipeline.nofollow import drop_stray, open_file, regular
from pipeline.reference import Reference
from pipeline.sinks import HashingWriter, InlineWriter
from pipeline.tiers.disk import DiskTier
from pipeline.writebehind import WriteBehind

if TYPE_CHECKING:  # annotations only: a warm without a remote tier need not load it,
    # and reading an image from the cache needs no HTTP client
    from pipeline.registry.client import RegistryClient
    from pipeline.tiers.remote import RemoteTier

log = logging.getLogger("layerwarm")

DEFAULT_LIMITS = Limits()
# Runs CPU-bound work where it belongs (a pool of about one thread per core).
SubmitCPU = Callable[[Callable[[], Verified]], Future[Verified]]
SMALL_BLOB = 1 << 20  # compressed; below it, hash and write on the decompressing thread


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
        disk.ensure_room(layer.size, f"blob {layer.digest}")
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
    staging = disk.staging_file(layer.digest)
    if _staging_verified(staging, layer):
        return staging  # an earlier fetch whose decompress did not run
    partial = partial_path(staging)
    drop_stray(partial, "partial download")  # never resumed (appended to) through a link
    progress.stage(layer, "fetching", layer.size)
    last: Exception | None = None
    for source in layer.sources:
        try:
            with disk.space_guard():
                resumed = os.path.lexists(partial)
                try:
                    verified = _download(client, source, layer, partial, progress, growing)
                except VerificationError:
                    if not resumed:
                        raise
                    # The kept prefix may be what was wrong: one clean try before failing.
                    log.warning("blob %s: resumed download did not verify; starting over",
                                layer.digest)
                    partial.unlink()
                    progress.stage(layer, "fetching", layer.size)
                    verified = _download(client, source, layer, partial, progress, growing)
            os.replace(partial, staging)
            if growing is not None:
                growing.finish(verified)
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
        if drop_stray(staging, "staged layer blob"):
            return False  # a link is not an earlier fetch's blob: fetch it
        st = regular(staging)
        if st is None or st.st_size != layer.size:
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
) -> Verified:
    """Download the blob into `dest`, resuming after a cut by the one retry policy."""
    verifier = Verifier(layer.digest, size=layer.size, what="layer blob")
    resuming = os.path.lexists(dest)
    # Readable (a follower preads a duplicate of this descriptor) and unbuffered (each
    # chunk must be in the file when `growing.wrote` says so). Chunks are 1 MiB anyway.
    # A new file is made with O_EXCL: nothing put there since the look is written into.
    fd = open_file(dest, os.O_RDWR | (0 if resuming else os.O_CREAT | os.O_EXCL),
                   what="partial download")
    with open(fd, "r+b", buffering=0) as out:
        if resuming:
            _resume_point(out, verifier)
        if growing is not None:
            growing.attach(out.fileno(), verifier.count)
        if verifier.count:
            log.info("blob %s: resuming at byte %d", layer.digest, verifier.count)
            progress.advance(layer, verifier.count)
        attempts = client.retry.start(f"blob {layer.digest}")
        while verifier.count < layer.size:
            before = verifier.count
            try:
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
                if verifier.count > before:
                    attempts.progressed()  # a cut after progress: resume, as if first
                time.sleep(attempts.failed(e))
        return verifier.verify()  # no fsync: a staging file is hashed again before reuse


def decompress(
    layer: LayerSpec,
    disk: DiskTier,
    staging: Path,
    progress: Progress = NO_PROGRESS,
    limits: Limits = DEFAULT_LIMITS,
    inflate_on: SubmitCPU | None = None,
    keep_cached: bool = False,
) -> int:
    """Decompress the staging blob into the disk tier; the entry's size (`keep_cached`:
    see `decompress_stream`).

    The blob is hashed again as it is read (its verdict is the commit's proof, whatever
    happened to the file since its fetch). The staging file is removed once the entry
    exists, or when its content can never become one (wrong digest or diff_id, a bomb).
    """
    fd = open_file(staging, what="staged layer blob")
    with open(fd, "rb") as src:
        try:
            size = decompress_stream(
                layer, disk, VerifyingReader(src, layer.digest, layer.size), progress, limits,
                inflate_on, keep_cached)
        except VerificationError:
            staging.unlink(missing_ok=True)
            raise
    staging.unlink(missing_ok=True)
    return size


def decompress_stream(
    layer: LayerSpec,
    disk: DiskTier,
    src: BlobReader,
    progress: Progress = NO_PROGRESS,
    limits: Limits = DEFAULT_LIMITS,
    inflate_on: SubmitCPU | None = None,
    keep_cached: bool = False,
) -> int:
    """Decompress the blob read from `src` into the disk tier, verified; the entry's size.

    The entry is named only with both proofs: the tar's digest, and `src`'s verdict on the
    blob, which it gives only once it has read the blob's last byte and checked its digest.

    `inflate_on` (a CPU pool's submit) runs the inflate there, while the commit stays on
    this thread: it mostly waits for the disk (fsync), and a CPU slot held through it
    left the pool waiting on the disk for about a fifth of a cold fleet warm.
    `keep_cached`: a publish follows, which reads the entry: its pages stay in the page
    cache until that publish gives them back (`publish`).
    """
    with disk.space_guard(), disk.ingest(layer.digest, keep_cached=keep_cached) as ingest:
        index = IndexBuild(layer)

        def inflate() -> Verified:
            progress.stage(layer, "decompressing", layer.size)
            return inflate_verified(layer, src, ingest.file, progress, limits, index,
                                    keep_cached)

        tar = inflate() if inflate_on is None else inflate_on(inflate).result()
        ingest.commit(layer, tar, FromBlob(src.verdict()))
    index.store(disk)
    return tar.size


def inflate_verified(
    layer: LayerSpec,
    src: Readable,
    out: BinaryIO,
    progress: Progress = NO_PROGRESS,
    limits: Limits = DEFAULT_LIMITS,
    index: IndexBuild | None = None,
    keep_cached: bool = False,
) -> Verified:
    """Decompress `src` into `out` within the limits, verifying the diff_id; the proof.
    `index`, when given, is fed the tar as it is written (the caller stores it once the
    entry is committed). `keep_cached`: `out` stays in the page cache (a publish reads it
    next: pipeline/writebehind.py).

    `src` is read to its end, past the end of the compressed stream: whatever follows it
    (zero padding, a skippable frame) is part of the blob, and the blob's verdict covers it.
    Inflating, hashing and writing run on three threads (pipeline/sinks.py), except for a
    blob of at most 1 MiB, where starting the threads would cost more than the work.
    """
    compression = compression_for(layer.media_type)
    verifier = Verifier(layer.diff_id, what=f"layer {layer.digest} decompressed content")
    counting = _Counting(src, layer, progress)
    sink = HashingWriter(out, verifier, keep_cached=keep_cached) \
        if layer.size > SMALL_BLOB else InlineWriter(out, verifier)
    produced = 0
    # The index is fed here, not on a thread of its own: it reads headers only (a few
    # milliseconds a layer), and a fourth thread waking for every chunk cost the stage
    # ~10 % in handing the GIL around.
    feed = index.feed if index else None
    try:
        try:
            for chunk in iter_decompressed(counting, compression, f"layer {layer.digest}"):
                produced += len(chunk)
                _check_limits(layer, produced, counting.count, limits)
                sink.put(chunk)
                if feed:
                    feed(chunk)
        finally:
            sink.close()
        while counting.read(CHUNK):  # bytes after the stream: read, so the digest sees them
            pass
        return verifier.verify()
    except (DigestMismatch, SizeMismatch):
        raise VerificationError(
            f"layer {layer.digest}: decompressed content is {verifier.actual}, "
            f"but the image config says diff_id {layer.diff_id}"
        ) from None


def check_disk(layer: LayerSpec, disk: DiskTier, *, touch: bool = True) -> int | None:
    """The entry's size if the disk tier has it as this layer; else None (a miss).

    A hit is an entry whose row records this layer's diff_id and the entry's size. An
    entry whose size differs from its row (truncated by hand, a bad disk), or that has no
    row and does not hash to the diff_id, is removed here, so the caller fetches it again.
    An entry recorded with another diff_id is a miss and is left alone, unless its blob was
    verified: then the image config is wrong about it, and the layer fails at once.
    The caller holds the digest's lock. `touch=False` leaves marking a hit as used to the
    caller (the embedded runner marks a whole warm's hits at once).
    """
    size = disk.checked_size(layer.digest)  # a link or FIFO there is removed: a miss
    if size is None:
        return None
    path = disk.path(layer.digest)
    row = disk.meta.layer(layer.digest)
    if row is not None and row.uncompressed_size != size:
        log.warning("disk entry %s has %d bytes, %d recorded: fetching it again",
                    path, size, row.uncompressed_size)
        disk.remove(layer.digest)
        return None
    if row is not None and row.diff_id != layer.diff_id:
        if paired(row.origin):
            raise VerificationError(
                f"layer {layer.digest}: its verified blob decompresses to {row.diff_id}, "
                f"but the image config says diff_id {layer.diff_id}")
        log.warning("disk entry %s holds %s, not diff_id %s: not a hit",
                    path, row.diff_id, layer.diff_id)
        return None
    if row is None:
        # No row (a crash between naming and recording, or a file put there by hand): a
        # name alone is no proof, so hash it before adopting it, unpaired, as this layer.
        try:
            hash_file(path, layer.diff_id, None, f"disk entry {path}")
        except (VerificationError, NotAFile, OSError) as e:
            log.warning("%s; fetching it again", e)
            disk.remove(layer.digest)
            return None
        disk.meta.adopt_layer(layer.digest, layer.diff_id, size, time.time())
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


def remote_object(layer: LayerSpec, remote: RemoteTier,
                  limits: Limits = DEFAULT_LIMITS) -> int | None:
    """The size of the remote tier's object for this layer; None when the tier has none.

    Raises VerificationError when the object there is not this layer by what it says of
    itself (`remote_mismatch`: diff_id, the manifest's size, its own size), when it is
    bigger than a layer may be, or when the tier refuses it (a directory tier's entry or
    sidecar that is not a regular file). Every use of a remote object asks this first.
    """
    entry = remote.stat(layer.digest)
    if entry is None:
        return None
    where = f"remote entry {remote.url}/{layer.digest.cache_name}"
    why = remote_mismatch(layer, entry.size, entry.metadata)
    if why is not None:
        raise VerificationError(f"{where}: {why}")
    try:
        _check_limits(layer, entry.size, layer.size, limits)
    except LimitExceeded as e:
        raise LimitExceeded(f"{where}: {e}") from None
    return entry.size


def remote_hit(layer: LayerSpec, remote: RemoteTier,
               limits: Limits = DEFAULT_LIMITS) -> int | None:
    """`remote_object`, with an object that is not this layer logged and taken as a miss."""
    try:
        return remote_object(layer, remote, limits)
    except VerificationError as e:
        log.warning("%s: not a hit", e)
        return None


def restore(
    layer: LayerSpec, disk: DiskTier, remote: RemoteTier, progress: Progress = NO_PROGRESS,
    limits: Limits = DEFAULT_LIMITS,
) -> int | None:
    """Copy the layer from the remote tier to disk, verified; None when the remote lacks it.

    The object's metadata says how many bytes to expect (`remote_object`); the disk must
    have room for them before the first is written (else NoSpace), and the copy stops
    at that many (a longer stream is a SizeMismatch, nothing more written).
    """
    size = remote_object(layer, remote, limits)
    if size is None:
        return None
    where = f"remote entry {remote.url}/{layer.digest.cache_name}"
    disk.ensure_room(size, where)
    progress.stage(layer, "restoring", size)
    verifier = Verifier(layer.diff_id, size=size, what=where)
    with disk.space_guard(), disk.ingest(layer.digest) as ingest:
        index = IndexBuild(layer)
        # To disk as it comes and out of the page cache, as a decompressed entry is.
        with WriteBehind(ingest.file) as out:

            def write(chunk: bytes | memoryview) -> None:  # hashed as it is copied: one pass
                verifier.update(chunk)  # raises past `size`, before the chunk is written
                out.write(chunk)
                index.feed(chunk)

            remote.stream(layer.digest, write, lambda n: progress.advance(layer, n))
        tar = verifier.verify()
        ingest.commit(layer, tar, FromRemote(remote.url))
    index.store(disk)
    return tar.size


def publish(
    layer: LayerSpec,
    disk: DiskTier,
    remote: RemoteTier,
    progress: Progress = NO_PROGRESS,
    *,
    force: bool = False,
) -> bool:
    """Upload the disk entry to the remote tier unless it is there already; True if uploaded.

    Only an entry made from this digest's verified blob (or copied from the remote tier)
    is published: content shared by diff_id, or adopted without a row, proves nothing
    about the digest it is named for. An object there that `remote_object` does not take
    for this layer, or of another size than the entry, is replaced.

    The entry's pages leave the page cache once it is over: the decompress kept them for
    this read (`keep_cached`), or this read brought them in.
    """
    try:
        return _publish(layer, disk, remote, progress, force)
    finally:
        disk.drop_cached(layer.digest)


def _publish(
    layer: LayerSpec, disk: DiskTier, remote: RemoteTier, progress: Progress, force: bool,
) -> bool:
    path = disk.path(layer.digest)
    row = disk.meta.layer(layer.digest)
    if row is None or not paired(row.origin) or row.diff_id != layer.diff_id:
        log.info("layer %s not published: its entry was not made from its own verified blob",
                 layer.digest)
        disk.meta.set_publish_pending(layer.digest, False)  # nor will it ever be
        return False
    try:
        size = os.stat(path, follow_symlinks=False).st_size
    except FileNotFoundError:
        return _evicted_before_publish(layer)
    if not force:
        try:
            there = remote_object(layer, remote) == size
        except RemoteTierUnavailable:
            disk.meta.set_publish_pending(layer.digest, True)
            raise
        except VerificationError as e:
            log.info("replacing it: %s", e)
            there = False
        if there:
            disk.meta.set_publish_pending(layer.digest, False)
            return False
    progress.stage(layer, "publishing", size)
    try:
        publish_index(layer, disk, remote)  # first: a visible layer has its index
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
