"""The remote cache tier (tier 2): `open_remote(url)` picks the implementation.

    RemoteTier (protocol, pipeline/tiers/base.py)
    ├── S3Tier         s3://bucket[/prefix]  plain boto3: AWS, MinIO, Ceph RGW, R2, moto
    └── DirectoryTier  file:///abs/path      e.g. an NFS mount shared by the workers

The implementations import the protocol from `base`, never this module, so nothing here
is imported in a cycle; they are loaded lazily, so that a worker without a remote tier
never pays for importing boto3.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import unquote, urlsplit

from pipeline.errors import UsageError
from pipeline.tiers.base import METADATA_KEYS, RemoteEntry, RemoteTier

__all__ = ["METADATA_KEYS", "RemoteEntry", "RemoteTier", "open_remote"]


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
