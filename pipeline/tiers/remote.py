"""The remote cache tier (tier 2): a shared blob store holding decompressed layer tars.

Every implementation stores a layer under its digest's cache name, `sha256_<hex>`, below
one root (an S3 bucket + optional prefix, or a directory), together with a few string
metadata values. Names are only ever built from a `Digest`, never from raw strings, so
no input can address anything outside the root.

    RemoteTier (protocol)
    ├── S3Tier         s3://bucket[/prefix]  plain boto3: AWS, MinIO, Ceph RGW, R2, moto
    └── DirectoryTier  file:///abs/path      e.g. an NFS mount shared by the workers

`open_remote(url)` picks the implementation. The modules behind it are imported lazily so
that a worker without a remote tier never pays for importing boto3.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable
from urllib.parse import unquote, urlsplit

from pipeline.digest import Digest
from pipeline.errors import InvalidDigest, UsageError

__all__ = ["METADATA_KEYS", "RemoteEntry", "RemoteTier", "open_remote"]

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
    `UsageError` (misconfiguration such as a bucket that does not exist).
    """

    url: str  # for messages and logs; never contains credentials

    def connect(self) -> None:
        """Do now what the first request would do first (make the client, check that the
        bucket or directory is there); for a long-running worker. Raises as the others do."""
        ...

    def stat(self, digest: Digest) -> RemoteEntry | None:
        """The entry for `digest`, or None when the tier does not have it."""
        ...

    def download(self, digest: Digest, dest: Path, progress: Progress | None = None) -> RemoteEntry:
        """Write the layer's bytes to `dest` (created or truncated); NotFound if absent.

        The caller verifies the hash before giving the file a cache name.
        """
        ...

    def read_range(self, digest: Digest, offset: int, length: int) -> bytes:
        """At most `length` bytes of the layer from `offset` (fewer only at its end); the
        caller checks them (the read path, against its index's chunk digests)."""
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
        """Remove the layer; True when it was there."""
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


def _redacted(url: str) -> str:
    """`url` safe to show: any user:password@ part is replaced, since it may be a secret."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url  # as typed: a normalised form would not be what the user recognises
    return parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]).geturl()


# Bucket names as S3-compatible stores accept them (AWS is stricter, legacy buckets and
# Ceph allow upper case and underscores); the check just keeps ports, users and paths out.
_BUCKET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")


def open_remote(url: str) -> RemoteTier:
    """The remote tier a URL names: `s3://bucket[/prefix]` or `file:///absolute/path`.

    Anything else raises UsageError with a one-line message naming the URL. Credentials
    never belong in the URL: S3 uses the standard AWS chain (and AWS_ENDPOINT_URL_S3).
    """
    if not isinstance(url, str):
        raise UsageError(f"remote tier URL must be a string, got {type(url).__name__}")
    shown = _redacted(url.strip())
    hint = "want s3://bucket[/prefix] or file:///absolute/path"
    parts = urlsplit(url.strip())
    if parts.query or parts.fragment:
        raise UsageError(f"remote tier URL {shown!r}: no query or fragment allowed; {hint}")
    scheme = parts.scheme.lower()

    if scheme == "s3":
        if "@" in parts.netloc:
            raise UsageError(
                f"remote tier URL {shown!r}: credentials do not belong in the URL; "
                "use the AWS credential chain (AWS_ACCESS_KEY_ID, profiles, roles)"
            )
        if not _BUCKET.fullmatch(parts.netloc):
            raise UsageError(f"remote tier URL {shown!r}: missing or invalid bucket; {hint}")
        segments = [s for s in parts.path.split("/") if s]
        if any(s in (".", "..") for s in segments) or "//" in parts.path.strip("/"):
            raise UsageError(f"remote tier URL {shown!r}: prefix has empty, . or .. parts")
        from pipeline.tiers.s3 import S3Tier

        return S3Tier(parts.netloc, "/".join(segments))

    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise UsageError(
                f"remote tier URL {shown!r}: file URLs need an absolute path (file:///path)"
            )
        path = unquote(parts.path)
        if not path.startswith("/"):
            raise UsageError(f"remote tier URL {shown!r}: path must be absolute; {hint}")
        from pipeline.tiers.directory import DirectoryTier

        # normpath folds "a/../b" so the root shown in messages is the one really used.
        return DirectoryTier(Path(os.path.normpath(path)))

    raise UsageError(f"unsupported remote tier URL {shown!r}: {hint}")
