"""`layerwarm verify`: re-hash cache entries against their recorded diff_id.

A bad entry (content or size not what was recorded) is removed, or only listed with
`report_only`; an entry with no record cannot be judged and says so. Remote entries are
checked against the diff-id in their own metadata, hashed as they stream (nothing written).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from pipeline.digest import Digest, Verifier, hash_file
from pipeline.errors import LayerwarmError, NotAFile, VerificationError
from pipeline.nofollow import regular
from pipeline.tiers.disk import DiskTier

if TYPE_CHECKING:  # annotations only: a warm without a remote tier need not load it
    from pipeline.tiers.remote import RemoteTier


@dataclass(frozen=True)
class Checked:
    digest: Digest
    tier: Literal["disk", "remote"]
    state: Literal["ok", "bad", "unverifiable", "missing"]
    reason: str | None = None
    removed: bool = False


def verify_disk(
    disk: DiskTier, digests: Sequence[Digest] | None = None, *, report_only: bool = False
) -> list[Checked]:
    out = []
    # Every entry name on disk, links and FIFOs too: they are reported (and removed).
    for digest in digests if digests is not None else sorted(disk.entries() + disk.strays()):
        with disk.lock(digest):
            path = disk.path(digest)
            try:
                found = regular(path, "cache entry")
            except NotAFile as e:  # no entry; removing the name leaves a link's target alone
                out.append(Checked(digest, "disk", "bad", str(e),
                                   not report_only and disk.remove(digest)))
                continue
            if found is None:
                out.append(Checked(digest, "disk", "missing", f"no entry {path.name}"))
                continue
            row = disk.meta.layer(digest)
            if row is None:
                out.append(Checked(digest, "disk", "unverifiable", "no recorded diff_id"))
                continue
            try:
                hash_file(path, row.diff_id, row.uncompressed_size, f"disk entry {path}")
            except (VerificationError, NotAFile) as e:
                removed = not report_only and disk.remove(digest)
                out.append(Checked(digest, "disk", "bad", str(e), removed))
                continue
            out.append(Checked(digest, "disk", "ok"))
    return out


def verify_remote(
    remote: RemoteTier, disk: DiskTier, digests: Sequence[Digest] | None = None, *,
    report_only: bool = False,
) -> list[Checked]:
    out = []
    wanted = digests if digests is not None else [e.digest for e in remote.list()]
    for digest in wanted:
        try:
            entry = remote.stat(digest)
        except VerificationError as e:  # refused by the tier (a planted link): not a layer
            removed = not report_only and remote.delete(digest)
            out.append(Checked(digest, "remote", "bad", str(e), removed))
            continue
        if entry is None:
            out.append(Checked(digest, "remote", "missing", f"not in {remote.url}"))
            continue
        try:
            diff_id = Digest.parse(entry.metadata.get("diff-id", ""))
        except LayerwarmError:
            out.append(Checked(digest, "remote", "unverifiable", "no diff-id in its metadata"))
            continue
        size = entry.metadata.get("uncompressed-size", "")
        verifier = Verifier(diff_id, size=int(size) if size.isdigit() else None,
                            what=f"remote entry {remote.url}/{digest.cache_name}")
        try:
            remote.stream(digest, verifier.update)  # hashed as it streams: nothing written
            verifier.verify()
        except VerificationError as e:
            removed = not report_only and remote.delete(digest)
            out.append(Checked(digest, "remote", "bad", str(e), removed))
            continue
        out.append(Checked(digest, "remote", "ok"))
    return out
