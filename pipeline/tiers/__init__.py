"""Cache tiers: local disk (tier 1) and a shared remote blob store (tier 2).

Both name a layer by its manifest digest, `sha256_<hex>`. The remote tier's protocol and
`open_remote` are re-exported here; S3Tier and DirectoryTier live in `tiers.s3` and
`tiers.directory` and are imported only when a URL asks for them (boto3 is heavy). The
re-exports load `tiers.remote` at first use, so a warm without a remote tier, which imports
`tiers.disk` (and so this package), does not load it.
"""

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.tiers.remote import METADATA_KEYS, RemoteEntry, RemoteTier, open_remote

__all__ = ["METADATA_KEYS", "RemoteEntry", "RemoteTier", "open_remote"]


def __getattr__(name: str) -> object:
    if name in __all__:
        from pipeline.tiers import remote

        return getattr(remote, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
