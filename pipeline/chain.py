"""The lookup chain: where a layer is looked for, in what order, and what is written back.

This module is the one place that spells the order. Each tier is a `LayerSource`:

    DiskSource      the entry on this host's disk, if it is this layer (stages.check_disk)
    ShareSource     content on disk with the layer's diff_id under another digest: linked
    RemoteSource    the remote tier's object, if its metadata says it is the layer
                    (stages.remote_object) and it fits on disk: restored
    registry        the blob, fetched and decompressed (an embedded step, or Celery's)

`materialize` asks them in order for a goal, under the digest's lock, then writes back:

    goal "disk"   (a warm, a node target)   disk -> share -> remote -> registry
    goal "remote" (the fleet's shared tier) remote -> disk -> registry

    from the registry      publish to the remote tier
    from disk              publish when the goal is the remote tier, or an earlier
                           publish could not run (its row says so)
    from a share (link)    never published: nothing proves the blob is that content
    from the remote tier   nothing more

The embedded runner, every Celery stage task and `plan`'s locate go through here. A source
can also serve a byte range of a layer's tar (`read_range`), for reading files out of an
image without materializing all of it; the read path asks the same order.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

from pipeline import sharing
from pipeline.codecs import compression_for
from pipeline.config import Limits
from pipeline.digest import Digest
from pipeline.errors import (
    NoSpace,
    NotFound,
    RemoteTierUnavailable,
    Unauthorized,
    VerificationError,
)
from pipeline.layer import NO_PROGRESS, LayerResult, LayerSpec, Progress, Source, paired
from pipeline.nofollow import open_file
from pipeline.stages import (
    DEFAULT_LIMITS,
    check_disk,
    publish,
    remote_hit,
    remote_object,
    restore,
)
from pipeline.tiers.disk import DiskTier

if TYPE_CHECKING:  # annotations only: a warm without a remote tier need not load it
    from pipeline.tiers.remote import RemoteTier

log = logging.getLogger("layerwarm")

Goal = Literal["disk", "remote"]
# The registry step: makes the entry and returns its size, or None when the rest of it
# runs elsewhere (a Celery decompress task, which then calls `write_back`).
RegistryStep = Callable[[LayerSpec, Progress], "int | None"]


class LayerSource(Protocol):
    """A tier that may hold a layer. `provide` runs under the digest's lock."""

    name: Source

    def has(self, layer: LayerSpec) -> bool:
        """Whether this tier holds the layer, changing nothing (plan, status)."""
        ...

    def provide(self, layer: LayerSpec, progress: Progress) -> int | None:
        """Make the layer's verified entry on disk (or find it there): its size, or None."""
        ...

    def read_range(self, layer: LayerSpec, offset: int, length: int) -> bytes:
        """At most `length` bytes of the layer's tar from `offset`; NotFound if absent."""
        ...


@dataclass
class DiskSource:
    disk: DiskTier
    name: Source = "disk"
    # For the remote tier's sake: only an entry made from its own verified blob will do,
    # since nothing else may be published under the digest.
    paired_only: bool = False

    def has(self, layer: LayerSpec) -> bool:
        if self.disk.size(layer.digest) is None:
            return False
        row = self.disk.meta.layer(layer.digest)
        if row is None:
            return not self.paired_only
        return row.diff_id == layer.diff_id and (not self.paired_only or paired(row.origin))

    def provide(self, layer: LayerSpec, progress: Progress) -> int | None:
        size = check_disk(layer, self.disk, touch=False)  # the runner marks hits at once
        if size is not None and self.paired_only:
            row = self.disk.meta.layer(layer.digest)
            if row is None or not paired(row.origin):
                return None  # fetched again: the verified blob replaces it
        return size

    def read_range(self, layer: LayerSpec, offset: int, length: int) -> bytes:
        try:
            fd = open_file(self.disk.path(layer.digest), what="cache entry")
        except FileNotFoundError:
            raise NotFound(f"layer {layer.digest} is not on disk") from None
        try:
            return os.pread(fd, length, offset)
        finally:
            os.close(fd)


@dataclass
class ShareSource:
    disk: DiskTier
    name: Source = "link"

    def has(self, layer: LayerSpec) -> bool:
        return sharing.source_for(self.disk, layer.digest, layer.diff_id) is not None

    def provide(self, layer: LayerSpec, progress: Progress) -> int | None:
        if self.disk.size(layer.digest) is not None:
            return None  # an entry that is not a hit is never replaced by a link
        shared = sharing.share(layer, self.disk)
        return None if shared is None else shared.size

    def read_range(self, layer: LayerSpec, offset: int, length: int) -> bytes:
        source = sharing.source_for(self.disk, layer.digest, layer.diff_id)
        if source is None:
            raise NotFound(f"no entry on disk has the content of layer {layer.digest}")
        return DiskSource(self.disk).read_range(
            LayerSpec(source, layer.diff_id, layer.media_type, layer.size), offset, length)


@dataclass
class RemoteSource:
    disk: DiskTier
    remote: RemoteTier
    name: Source = "remote"
    unavailable: bool = False  # it did not answer: do not publish to it either
    corrupt: bool = False      # its object is not this layer: publish over it
    limits: Limits = DEFAULT_LIMITS

    def has(self, layer: LayerSpec) -> bool:
        return remote_hit(layer, self.remote, self.limits) is not None

    def provide(self, layer: LayerSpec, progress: Progress) -> int | None:
        try:
            return restore(layer, self.disk, self.remote, progress, self.limits)
        except (RemoteTierUnavailable, Unauthorized) as e:
            # Refused (a 403 on the read, a share we may not open) is as good as down
            # for this layer: not published over either, since we could not read it.
            log.warning("remote tier unavailable, using the registry: %s", e)
            self.unavailable = True
        except VerificationError as e:
            self._corrupt(e)
        except NoSpace as e:  # the registry's copy may be smaller (or say so itself)
            log.warning("remote entry does not fit, using the registry: %s", e)
        except NotFound:
            pass  # removed between stat and download (remote gc): a miss
        return None

    def check(self, layer: LayerSpec) -> int | None:
        """The object's size if it is this layer by its metadata, copying nothing: the
        hit of the fleet's goal, which is the remote tier itself."""
        try:
            return remote_object(layer, self.remote, self.limits)
        except VerificationError as e:
            self._corrupt(e)
            return None

    def _corrupt(self, e: VerificationError) -> None:
        log.warning("remote entry is corrupt, using the registry: %s", e)
        self.corrupt = True

    def read_range(self, layer: LayerSpec, offset: int, length: int) -> bytes:
        """Unchecked bytes: the read path has asked `has` for the layer, and checks each
        range against the layer's index (pipeline/layerread.py)."""
        return self.remote.read_range(layer.digest, offset, length)


@dataclass
class Chain:
    """The tiers of one cache, and the registry step that ends the chain."""

    disk: DiskTier
    remote: RemoteTier | None
    registry: RegistryStep
    limits: Limits = DEFAULT_LIMITS  # what a remote object may claim to be (restore's cap)

    def sources(self, goal: Goal = "disk") -> Iterator[LayerSource]:
        """The tiers in the order they are asked (the registry comes after them)."""
        remote = None if self.remote is None else \
            RemoteSource(self.disk, self.remote, limits=self.limits)
        if goal == "remote":
            assert remote is not None, "a remote goal needs a remote tier"
            yield remote
            yield DiskSource(self.disk, paired_only=True)
            return
        yield DiskSource(self.disk)
        yield ShareSource(self.disk)
        if remote is not None:
            yield remote

    def locate(self, layers: Sequence[LayerSpec]) -> dict[LayerSpec, Source | None]:
        """Where each layer would come from now, changing nothing (None: the registry)."""
        return {x: next((s.name for s in self.sources() if s.has(x)), None) for x in layers}

    def materialize(
        self,
        layer: LayerSpec,
        *,
        goal: Goal = "disk",
        progress: Progress = NO_PROGRESS,
        claim: Callable[[], None] | None = None,
    ) -> LayerResult:
        """Make the layer present where `goal` says, by the chain's order; then write back.

        `claim` runs just before the registry step (a fleet's lease: it raises to say
        another worker is fetching). A result with source "registry" and no size means
        the registry step goes on elsewhere, and its end calls `write_back`.
        Raises LayerwarmError subclasses; the caller records them per layer.
        """
        started = time.monotonic()
        compression_for(layer.media_type)  # fail before any download for a type we can't unpack
        result = LayerResult(layer)
        sources = list(self.sources(goal))
        with self.disk.lock(layer.digest), ExitStack() as content:
            if not self._from_tiers(layer, sources, goal, progress, content, result):
                if goal == "remote":
                    content.enter_context(sharing.content_lock(self.disk, layer.diff_id))
                if claim is not None:
                    claim()
                # Whoever held the claim until just now may have published the layer: the
                # remote tier is asked again, holding the claim, before the registry is.
                if claim is None or not self._from_tiers(
                        layer, [x for x in sources if isinstance(x, RemoteSource)], goal,
                        progress, content, result):
                    log.info("fetching layer from registry: %s (%d bytes)", layer.digest,
                             layer.size)
                    result.source = "registry"
                    result.uncompressed_size = self.registry(layer, progress)
                    if result.uncompressed_size is None:
                        result.seconds = time.monotonic() - started
                        return result  # decompressed elsewhere; that end writes back
                    log.info("layer decompressed and cached: %s (%d bytes) %s", layer.digest,
                             result.uncompressed_size, self.disk.path(layer.digest))
        remote = next((x for x in sources if isinstance(x, RemoteSource)), None)
        if remote is None or not remote.unavailable:
            corrupt = remote is not None and remote.corrupt  # publish over it
            result.published = self.write_back(layer, result.source, goal=goal,
                                                progress=progress, force=corrupt)
        elif result.source == "registry":
            self.disk.meta.set_publish_pending(layer.digest, True)
        result.seconds = time.monotonic() - started
        progress.stage(layer, "done", None)
        return result

    def _from_tiers(self, layer: LayerSpec, sources: Sequence[LayerSource], goal: Goal,
                    progress: Progress, content: ExitStack, result: LayerResult) -> bool:
        """Ask the tiers in order; fill `result` from the first that has the layer."""
        for source in sources:
            if isinstance(source, ShareSource):
                # One materialization per diff_id at a time: the next one links to it.
                content.enter_context(sharing.content_lock(self.disk, layer.diff_id))
            if goal == "remote" and isinstance(source, RemoteSource):
                found = source.check(layer)  # the goal itself: no copy
            else:
                found = source.provide(layer, progress)
            if found is None:
                continue
            result.source, result.uncompressed_size = source.name, found
            if isinstance(source, ShareSource):
                row = self.disk.meta.layer(layer.digest)
                result.shared_from = _shared_source(row.origin if row else "")
            log.info("%s cache hit: %s (%d bytes) %s", source.name, layer.digest, found,
                     self.disk.path(layer.digest))
            return True
        return False

    def wants_publish(self, layer: LayerSpec, source: Source | None, goal: Goal = "disk") -> bool:
        """Whether a layer that came from `source` is owed to the remote tier."""
        if self.remote is None or source in ("link", "remote", None):
            return False
        if source == "registry" or goal == "remote":
            return True
        row = self.disk.meta.layer(layer.digest)  # a disk hit: only an owed publish
        return row is not None and row.publish_pending

    def write_back(
        self, layer: LayerSpec, source: Source | None, *, goal: Goal = "disk",
        progress: Progress = NO_PROGRESS, force: bool = False,
    ) -> bool | None:
        """Publish what the chain's rules say is owed; True if uploaded, None if not asked.

        A remote tier that does not answer leaves the layer warm on disk, marked to be
        published by a later run; for goal "remote" that is a failure, and it raises.
        """
        if not self.wants_publish(layer, source, goal):
            return None
        assert self.remote is not None
        try:
            return publish(layer, self.disk, self.remote, progress, force=force)
        except RemoteTierUnavailable as e:
            if goal == "remote":
                raise
            log.warning("publish to remote tier failed, layer stays on disk: %s", e)
            return None


def quick_hit(layer: LayerSpec, chain: Chain, progress: Progress = NO_PROGRESS,
              ) -> LayerResult | None:
    """The layer as a disk hit that needs nothing more, or None: ask `Chain.materialize`.

    The chain's first source, checked without the digest's lock (which guards making an
    entry, not reading one: an entry is named only once complete). A hit here has the
    size and the diff_id its row records, and no publish pending; anything else goes
    through `materialize`, under the lock. A warm of cached images then needs no thread
    per layer.
    """
    size = chain.disk.size(layer.digest)
    if size is None:
        return None
    row = chain.disk.meta.layer(layer.digest)
    if row is None or row.uncompressed_size != size or row.diff_id != layer.diff_id \
            or chain.wants_publish(layer, "disk"):
        return None
    log.info("disk cache hit: %s (%d bytes) %s", layer.digest, size, chain.disk.path(layer.digest))
    progress.stage(layer, "done", None)
    return LayerResult(layer, source="disk", uncompressed_size=size)


def _shared_source(origin: str) -> Digest | None:
    _, _, digest = origin.partition("shared:")
    return Digest.parse(digest) if digest else None
