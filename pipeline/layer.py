"""Values about one layer: what is wanted, where its bytes came from, how it went.

    LayerSpec    what a manifest and its image config say about a layer (untrusted)
    Origin       how an entry's bytes are tied to its digest: the blob was verified
                 (FromBlob), the remote tier vouches for it (FromRemote), or it only shares
                 content with another entry (Shared); the disk tier's commit records it
    LayerResult  how materializing one layer ended
    Progress     the callbacks that report stages and bytes (a bar, a job record)

Nothing here does I/O; every other pipeline module may import it.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from pipeline.digest import Digest, Verified
from pipeline.reference import Reference

# Where a layer came from. "link": from a disk entry with the same diff_id under another
# digest (pipeline/sharing.py).
Source = Literal["disk", "link", "remote", "registry"]


@dataclass(frozen=True)
class LayerSpec:
    """One layer to materialize: what the manifest and image config say about it.

    The config is untrusted input: `diff_id` says what the tar must hash to, not that the
    blob named `digest` is that tar. Only a verified blob (`FromBlob`) pairs the two.
    """

    digest: Digest                     # of the compressed blob; names the cache entry
    diff_id: Digest                    # of the decompressed tar, from the image config
    media_type: str
    size: int                          # compressed size from the manifest
    sources: tuple[Reference, ...] = field(default=(), compare=False)  # repos that have it


@dataclass(frozen=True)
class FromBlob:
    """The entry was decompressed from its own blob, whose digest was verified."""

    blob: Verified


@dataclass(frozen=True)
class FromRemote:
    """The entry was copied from the remote tier, whose object's metadata names its diff_id.

    Only entries made from a verified blob are ever published, so the remote tier pairs a
    digest with a diff_id as firmly as a fetch does.
    """

    url: str


@dataclass(frozen=True)
class Shared:
    """The entry shares the content of another entry with the same diff_id.

    Nothing proves that this digest's blob decompresses to that content: the image config
    said so. Such an entry serves images that say the same, and is never published.
    """

    source: Digest


Origin = FromBlob | FromRemote | Shared


def origin_text(origin: Origin) -> str:
    """How an origin is recorded in `.meta.db` (the `origin` column)."""
    if isinstance(origin, FromBlob):
        return "blob"
    if isinstance(origin, FromRemote):
        return "remote"
    return f"shared:{origin.source}"


def paired(recorded_origin: str) -> bool:
    """Whether a recorded origin proves the digest-diff_id pairing (so it may be published)."""
    return recorded_origin in ("blob", "remote")


def remote_metadata(layer: LayerSpec, uncompressed_size: int) -> dict[str, str]:
    """What a published object carries: the pairing a hit in the remote tier is checked by."""
    return {
        "diff-id": str(layer.diff_id),
        "media-type": layer.media_type,
        "compressed-size": str(layer.size),
        "uncompressed-size": str(uncompressed_size),
    }


# What a remote object's metadata must say for it to be taken as a layer. Not media-type:
# one blob may be listed under an OCI and a Docker type, and the tar is the same.
_PAIRING_KEYS = ("diff-id", "compressed-size", "uncompressed-size")


def remote_mismatch(layer: LayerSpec, size: int, metadata: Mapping[str, str]) -> str | None:
    """Why a remote tier's object of `size` bytes is not this layer; None if it may be.

    The one rule for trusting an object by its metadata (a restore, a fleet-target hit,
    publish's "already there"): it must be what `remote_metadata` would write for this
    layer and this size. The manifest's size and the object's own size pin the rest, so
    a restore knows how many bytes to expect before it reads one. Only hashing the bytes
    proves them; this keeps out objects that do not even claim to be the layer.
    """
    wanted = remote_metadata(layer, size)
    for key in _PAIRING_KEYS:
        if metadata.get(key) != wanted[key]:
            return f"its {key} is {metadata.get(key)!r:.80}, not {wanted[key]}"
    return None


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
