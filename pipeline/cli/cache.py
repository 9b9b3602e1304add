"""ls, inspect, usage, rm, df, metrics: the logic is pipeline/cacheops.py; this module prints."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from pipeline.cli.common import EXIT_FAILED, EXIT_OK, settings_of, when
from pipeline.table import counted, table

if TYPE_CHECKING:
    from pipeline.cacheops import ImageUse
    from pipeline.stats import HitRatio


def _cache(args: argparse.Namespace, *, remote_from_env: bool = True,
           read_only: bool = True):  # -> (DiskTier, remote)
    """The disk tier (read_only: for commands that only look, which never write .meta.db)
    and the remote tier when one is given."""
    from pipeline.tiers.disk import DiskTier
    from pipeline.tiers.remote import open_remote

    settings = settings_of(args)
    url = settings.remote_url if remote_from_env else args.remote
    return DiskTier(settings.cache_dir, read_only=read_only), (open_remote(url) if url else None)


def _images_json(images) -> list[dict]:
    return [{"ref": i.ref, "manifest_digest": i.manifest_digest, "platform": i.platform}
            for i in images]


def _images_table(images: Sequence[ImageUse], indent: str = "") -> str:
    rows = [(i.ref, i.manifest_digest, i.platform or "-") for i in images]
    return "\n".join(table(("REF", "MANIFEST", "PLATFORM"), rows, indent=indent))


def _entry_json(e) -> dict:
    return {"digest": str(e.digest), "size": e.size, "tiers": list(e.tiers),
            "disk_size": e.disk_size, "remote_size": e.remote_size, "diff_id": e.diff_id,
            "media_type": e.media_type, "compressed_size": e.compressed_size,
            "uncompressed_size": e.uncompressed_size,
            "created": None if e.created is None else when(e.created),
            "last_used": None if e.last_used is None else when(e.last_used),
            "pinned_until": None if e.pinned_until is None else when(e.pinned_until),
            "images": _images_json(e.images)}


def cmd_ls(args: argparse.Namespace) -> int:
    from pipeline import cacheops
    from pipeline.progress import human_bytes

    disk, remote = _cache(args)
    found = cacheops.list_entries(disk, remote)
    if args.json:
        print(json.dumps([_entry_json(e) for e in found], indent=2))
        return EXIT_OK
    rows = [(str(e.digest), human_bytes(e.size), when(e.last_used), "+".join(e.tiers),
             str(e.image_count)) for e in found]
    header: tuple[str, ...] = ("LAYER", "SIZE", "LAST USED", "TIERS", "IMAGES")
    if any(e.pinned_until is not None for e in found):  # the column only when there are pins
        header += ("PINNED UNTIL",)
        rows = [(*r, when(e.pinned_until)) for r, e in zip(rows, found, strict=True)]
    print("\n".join(table(header, rows, right={1, 4})))
    total = sum(e.size for e in found)
    print(f"{counted(len(found), 'entry')}, {human_bytes(total)}")
    return EXIT_OK


def cmd_inspect(args: argparse.Namespace) -> int:
    from pipeline import cacheops
    from pipeline.progress import human_bytes

    disk, remote = _cache(args)
    [digest] = cacheops.resolve_digests(disk, [args.digest])
    entry = cacheops.inspect(disk, digest, remote)
    if entry is None:
        print(f"layerwarm: {digest}: not in the cache", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        shares = [str(d) for d in cacheops.shares_with(disk, digest)]
        print(json.dumps({**_entry_json(entry), "shares_content_with": shares}, indent=2))
        return EXIT_OK

    def size(n: int | None) -> str:
        return "-" if n is None else f"{human_bytes(n)} ({n} bytes)"

    where = []
    if entry.disk_size is not None:
        where.append(f"disk {disk.path(digest)}")
    if entry.remote_size is not None and remote is not None:
        where.append(f"remote {remote.url.rstrip('/')}/{digest.cache_name}")
    fields = [("digest", str(digest)), ("diff_id", entry.diff_id or "-"),
              ("media type", entry.media_type or "-"),
              ("compressed", size(entry.compressed_size)),
              ("uncompressed", size(entry.uncompressed_size)),
              ("created", when(entry.created)), ("last used", when(entry.last_used))]
    if entry.pinned_until is not None:
        fields.append(("pinned until", when(entry.pinned_until)))
    fields += [("tier", w) for w in where]
    fields += [("shares with", f"{d} (same file, same diff_id)")
               for d in cacheops.shares_with(disk, digest)]
    for name, value in fields:
        print(f"{name:<13} {value}")
    print(f"{'images':<13} {entry.image_count}")
    if entry.images:
        print(_images_table(entry.images, indent="  "))
    return EXIT_OK


def cmd_usage(args: argparse.Namespace) -> int:
    from pipeline import cacheops

    disk, _ = _cache(args, remote_from_env=False)
    [digest] = cacheops.resolve_digests(disk, [args.digest])
    images = cacheops.usage(disk, digest)
    cached = disk.has(digest)
    if args.json:
        print(json.dumps({"digest": str(digest), "cached": cached,
                          "images": _images_json(images)}, indent=2))
        return EXIT_OK
    if images:
        print(_images_table(images))
    state = "on disk" if cached else "not on disk"
    n = len({i.manifest_digest for i in images})
    print(f"{counted(n, 'image')} {'uses' if n == 1 else 'use'} {digest} ({state})")
    return EXIT_OK


def cmd_rm(args: argparse.Namespace) -> int:
    from pipeline import cacheops

    # The remote only when asked for; rm writes, so an unusable .meta.db is repaired.
    disk, remote = _cache(args, remote_from_env=False, read_only=False)
    digests = cacheops.resolve_digests(disk, args.digests)

    def waiting(d: object) -> None:
        print(f"layerwarm: {d}: in use, waiting for its lock", file=sys.stderr, flush=True)

    failed = False
    for r in cacheops.remove(disk, digests, remote, on_wait=waiting):
        if r.tiers:
            print(f"removed {r.digest} from {' and '.join(r.tiers)}")
        if r.error or not r.tiers:
            failed = True
            print(f"error: {r.digest}: {r.error or 'not in the cache'}", file=sys.stderr)
    return EXIT_FAILED if failed else EXIT_OK


def cmd_df(args: argparse.Namespace) -> int:
    from pipeline import cacheops, stats
    from pipeline.progress import human_bytes

    disk, _ = _cache(args, remote_from_env=False)
    t = cacheops.totals(disk)
    hits = stats.hit_ratio(disk.meta.counters())
    sharing = cacheops.sharing_totals(disk)
    meta = disk.meta.usage()
    if args.json:
        print(json.dumps({"cache_dir": str(disk.root), "entries": t.entries, "bytes": t.bytes,
                          "images": t.images, "shared_entries": t.shared_entries,
                          "referenced_bytes": t.referenced_bytes,
                          "saved_bytes": t.saved_bytes, **_hit_ratio_json(hits),
                          **_sharing_json(sharing),
                          "metadata": {"bytes": meta.bytes, "configs": meta.configs,
                                       "config_bytes": meta.config_bytes}}, indent=2))
        return EXIT_OK
    print(f"cache dir      {disk.root}")
    print(f"entries        {t.entries}")
    print(f"bytes          {human_bytes(t.bytes)} ({t.bytes} bytes)")
    print(f"images         {t.images}")
    print(f"shared         {t.shared_entries} (entries used by more than one image)")
    print(f"saved          {human_bytes(t.saved_bytes)} ({t.saved_bytes} bytes): the images' "
          f"layers add up to {human_bytes(t.referenced_bytes)}")
    print(_hit_ratio_text(hits))
    _print_sharing(sharing)
    print(f"metadata       {human_bytes(meta.bytes)} ({meta.bytes} bytes) in .meta.db: "
          f"{counted(meta.configs, 'image config')}, {human_bytes(meta.config_bytes)}")
    return EXIT_OK


def _percent(ratio: float | None) -> str:
    return "-" if ratio is None else f"{100 * ratio:.1f}%"


def _hit_ratio_text(h: HitRatio) -> str:
    return (f"hit ratio      disk {_percent(h.disk)} ({h.disk_hits} of {h.disk_lookups} "
            f"lookups), overall {_percent(h.overall)} ({h.cache_hits} of {h.layers} layers "
            "from a cache tier)")


def _hit_ratio_json(h: HitRatio) -> dict:
    return {"hit_ratio": {"disk": h.disk, "overall": h.overall, "disk_hits": h.disk_hits,
                          "disk_lookups": h.disk_lookups, "cache_hits": h.cache_hits,
                          "layers": h.layers}}


def cmd_metrics(args: argparse.Namespace) -> int:
    from pipeline import metrics

    disk, _ = _cache(args, remote_from_env=False)
    sys.stdout.write(metrics.render(disk))
    return EXIT_OK


def _sharing_json(t) -> dict:  # t: cacheops.SharingTotals
    return {"stored_bytes": t.stored_bytes, "linked_entries": t.linked_entries,
            "cross_compression_saved_bytes": t.cross_compression_saved_bytes,
            "image_bytes": t.image_bytes, "cross_image_saved_bytes": t.cross_image_saved_bytes}


def _print_sharing(t) -> None:  # t: cacheops.SharingTotals
    from pipeline.progress import human_bytes

    def n(b: int) -> str:
        return f"{human_bytes(b)} ({b} bytes)"

    print(f"stored         {n(t.stored_bytes)}: each hard-linked file once")
    print(f"linked         {t.linked_entries} (entries sharing one file by diff_id)")
    print(f"saved by links {n(t.cross_compression_saved_bytes)}: one file for digests "
          "with one diff_id")
    print(f"saved overall  {n(t.cross_image_saved_bytes)}: the images would take "
          f"{human_bytes(t.image_bytes)} storing their own layers")


def register(sub: argparse._SubParsersAction) -> None:
    def add(name: str, func, help: str, *, remote: str | None = None,
            json_out: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        p.add_argument("--cache-dir", metavar="DIR", help="disk tier (env LAYERWARM_CACHE_DIR)")
        if remote:
            p.add_argument("--remote", metavar="URL", help=remote)
        if json_out:
            p.add_argument("--json", action="store_true", help="print the result as JSON")
        p.set_defaults(func=func, remote=None, insecure_registry=[], io_threads=None,
                       cpu_threads=None)
        return p

    digest_help = "sha256:<hex>, sha256_<hex> or a unique prefix of 12+ hex"
    add("ls", cmd_ls, "list cached layers: size, last use, tiers, images using each",
        remote="list the remote tier too (env LAYERWARM_REMOTE)")
    p = add("inspect", cmd_inspect, "one layer: diff_id, media type, sizes, tiers, images",
            remote="look in the remote tier too (env LAYERWARM_REMOTE)")
    p.add_argument("digest", metavar="DIGEST", help=digest_help)
    p = add("usage", cmd_usage, "which images (refs and manifest digests) use a layer")
    p.add_argument("digest", metavar="DIGEST", help=digest_help)
    p = add("rm", cmd_rm, "remove layers from disk (and the remote tier with --remote)",
            remote="remove from this remote tier too (LAYERWARM_REMOTE is not used)",
            json_out=False)
    p.add_argument("digests", nargs="+", metavar="DIGEST", help=digest_help)
    add("df", cmd_df, "totals: entries, bytes, bytes saved by sharing layers, hit ratio, "
        ".meta.db's size")
    add("metrics", cmd_metrics, "Prometheus text: hits, misses, bytes, seconds, cache size",
        json_out=False)
