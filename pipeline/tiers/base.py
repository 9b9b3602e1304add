"""The remote tier's protocol and what its implementations share (no implementation here).

Every implementation stores a layer under its digest's cache name, `sha256_<hex>`, below
one root (an S3 bucket + optional prefix, or a directory), together with a few string
metadata values. Names are only ever built from a `Digest`, never from raw strings, so
no input can address anything outside the root.

    RemoteTier (protocol)
    ├── S3Tier         s3://bucket[/prefix]  plain boto3: AWS, MinIO, Ceph RGW, R2, moto
    └── DirectoryTier  file:///abs/path      e.g. an NFS mount shared by the workers

`open_remote(url)` (pipeline/tiers/remote.py) picks the implementation; they import this
module, and it imports none of them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from pipeline.digest import Digest
from pipeline.errors import InvalidDigest, UsageError

__all__ = ["METADATA_KEYS", "RemoteEntry", "RemoteTier", "checked_metadata", "entry_name"]

# The metadata keys publish writes; other keys are allowed but these are the contract.
METADATA_KEYS = ("diff-id", "media-type", "compressed-size", "uncompressed-size")

# S3 user metadata travels as HTTP headers (x-amz-meta-<key>): keys are case-folded by
# S3, values must be printable ASCII. Holding the directory tier to the same rule keeps
# both tiers interchangeable, so a layer published to one could be copied to the other.
_META_KEY = re.compile(r"[a-z0-9][a-z0-9-]*")
_META_VALUE = re.compile(r"[\x20-\x7e]*")

Progress = Callable[[int], None]


@dataclass(frozen=True)
class RemoteEntry:
    """One layer in the remote tier.

    `metadata` holds "diff-id", "media-type", "compressed-size" and "uncompressed-size"
    (all strings) when returned by `stat` or `download`. `list` leaves it empty: getting
    metadata from S3 costs one request per object, and listing must stay cheap.
    `modified` (epoch seconds: S3 LastModified, a file's mtime) is set by `list`, for gc
    by age; None where a tier does not say.
    """

    digest: Digest
    size: int
    metadata: dict[str, str]
    modified: float | None = None


@runtime_checkable
class RemoteTier(Protocol):
    """What the pipeline needs from a shared blob store.

    Errors: `RemoteTierUnavailable` (transient: unreachable, timeout, 5xx, throttling),
    `NotFound` (download of an absent layer), `Unauthorized` (access refused),
    `UsageError` (misconfiguration such as a bucket that does not exist),
    `VerificationError` (what is stored under the name cannot be a layer the tier wrote,
    e.g. a directory tier's entry or sidecar that is a symlink or a FIFO: refused, never
    followed). Metadata is untrusted: `pipeline.stages.remote_object` judges it.
    """

    url: str  # for messages and logs; never contains credentials

    def connect(self) -> None:
        """Do now what the first request would do first (make the client, check that the
        bucket or directory is there); for a long-running worker. Raises as the others do."""
        ...

    def stat(self, digest: Digest) -> RemoteEntry | None:
        """The entry for `digest`, or None when the tier does not have it (VerificationError
        when what is there is refused)."""
        ...

    def download(self, digest: Digest, dest: Path, progress: Progress | None = None) -> RemoteEntry:
        """Write the layer's bytes to `dest` (created or truncated); NotFound if absent.

        The caller verifies the hash before giving the file a cache name.
        """
        ...

    def stream(self, digest: Digest, write: Callable[[bytes | memoryview], object],
               progress: Progress | None = None) -> int:
        """Hand the layer's bytes, in order, to `write`; the count. NotFound if absent.

        The caller hashes them as they pass (a restore verifies while it copies, without
        reading the file again). Errors reading the tier are the tier's; errors from
        `write` (the local disk's) pass through as they are.
        """
        ...

    def read_range(self, digest: Digest, offset: int, length: int) -> bytes:
        """At most `length` bytes of the layer from `offset` (fewer only at its end); the
        caller checks them (the read path, against its index's chunk digests)."""
        ...

    def put_index(self, digest: Digest, data: bytes) -> None:
        """Store the layer's file index (pipeline/fileindex.py) beside it; a publish puts
        it before the layer, so a visible layer has its index."""
        ...

    def get_index(self, digest: Digest, cap: int) -> bytes | None:
        """The layer's stored file index; None when there is none or it is over `cap`
        bytes (never read whole). The caller checks it names the diff_id it expects."""
        ...

    def upload(
        self,
        digest: Digest,
        src: Path,
        metadata: Mapping[str, str],
        progress: Progress | None = None,
    ) -> None:
        """Store `src` as `digest`; the entry is never visible half-written."""
        ...

    def delete(self, digest: Digest) -> bool:
        """Remove the layer (and its file index); True when the layer was there."""
        ...

    def list(self) -> Iterator[RemoteEntry]:
        """Every well-formed layer entry with size and modified time (metadata left empty);
        other names are ignored."""
        ...


def entry_name(name: str) -> Digest | None:
    """The digest a stored name stands for, or None for anything that is not a cache name.

    Only the exact canonical form counts (`sha256_<64 lowercase hex>`), so junk, temp files
    and `sha256:` spellings are skipped by `list`.
    """
    try:
        digest = Digest.parse(name, allow_cache_name=True)
    except InvalidDigest:
        return None
    return digest if digest.cache_name == name else None


def checked_metadata(url: str, metadata: Mapping[str, str]) -> dict[str, str]:
    """A plain copy of `metadata`, or UsageError for keys/values S3 could not carry."""
    result: dict[str, str] = {}
    for key, value in metadata.items():
        if not isinstance(key, str) or not _META_KEY.fullmatch(key):
            raise UsageError(f"remote tier {url}: bad metadata key {key!r} (want [a-z0-9-])")
        if not isinstance(value, str) or not _META_VALUE.fullmatch(value):
            raise UsageError(
                f"remote tier {url}: metadata {key!r} must be printable ASCII, got {value!r:.80}"
            )
        result[key] = value
    return result


