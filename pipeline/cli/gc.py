"""gc, pin, unpin: the logic is pipeline/gc.py and pipeline/pins.py; this module prints."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    image_args,
    platform_arg,
    read_refs,
    settings_of,
    when,
)
from pipeline.config import Settings
from pipeline.errors import UsageError
from pipeline.table import counted, table

if TYPE_CHECKING:
    from pipeline.units import Size


def _gc_json(disk_root: Path, r) -> dict:
    return {"cache_dir": str(disk_root), "dry_run": r.dry_run, "max_size": r.target,
            "size_before": r.size_before, "size_after": r.size_after, "freed": r.freed,
            "under_quota": r.under_quota,
            "evicted": [{"digest": str(e.digest), "size": e.size, "freed": e.freed,
                         "last_used": when(e.last_used)} for e in r.evicted],
            "skipped": [{"digest": str(x.digest), "size": x.size, "reason": x.reason}
                        for x in r.skipped],
            "swept": [{"path": x.path, "size": x.size} for x in r.swept],
            "adopted": [str(d) for d in r.adopted], "dropped": [str(d) for d in r.dropped],
            "configs_dropped": r.configs_dropped, "config_bytes_dropped": r.config_bytes_dropped}


def _remote_gc_json(url: str, r) -> dict:
    return {"remote": url, "dry_run": r.dry_run, "max_size": r.max_size,
            "older_than": r.older_than, "size_before": r.size_before,
            "size_after": r.size_after, "freed": r.freed, "under_quota": r.under_quota,
            "evicted": [{"digest": str(e.digest), "size": e.size,
                         "modified": when(e.modified)} for e in r.evicted],
            "pinned": [str(d) for d in r.pinned]}


def cmd_gc(args: argparse.Namespace) -> int:
    from pipeline import gc
    from pipeline.progress import human_bytes
    from pipeline.tiers.disk import DiskTier
    from pipeline.tiers.remote import open_remote
    from pipeline.units import parse_duration, parse_size

    settings = settings_of(args)
    given = parse_size(args.max_size, "--max-size") if args.max_size else None
    verb = "would evict" if args.dry_run else "evicted"
    # A dry run changes nothing, .meta.db included: an unusable one is read as empty.
    disk = DiskTier(settings.cache_dir, read_only=args.dry_run)
    if args.remote is not None:
        url = args.remote or Settings.from_env().remote_url  # bare --remote: the env's
        if not url:
            raise UsageError("gc --remote: no remote tier (give --remote URL or LAYERWARM_REMOTE)")
        older = parse_duration(args.older_than, "--older-than") if args.older_than else None
        if given is None and older is None:
            raise UsageError("gc --remote needs --max-size and/or --older-than")
        remote = open_remote(url)
        rr = gc.collect_remote(remote, max_size=given and given.bytes, older_than=older,
                               dry_run=args.dry_run, disk=disk)
        show = given.show if given else human_bytes  # sizes in the unit the user gave
        if args.json:
            print(json.dumps(_remote_gc_json(remote.url, rr), indent=2))
        else:
            for e in rr.evicted:
                print(f"{verb} {e.digest}  {show(e.size)}  stored {when(e.modified)}")
            for d in rr.pinned:
                print(f"kept {d}  pinned")
            print(f"remote {remote.url}: {show(rr.size_before)} before, "
                  f"{show(rr.size_after)} after; "
                  f"{verb} {counted(len(rr.evicted), 'layer')}, {show(rr.freed)}")
        return _gc_exit(rr.under_quota, rr.size_after, given)
    if args.older_than:
        raise UsageError("--older-than applies to the remote tier (gc --remote)")
    if given is None:
        given = settings.max_cache_size  # LAYERWARM_MAX_CACHE_SIZE; None: housekeeping only
    grace = parse_duration(args.grace, "--grace") if args.grace else gc.DEFAULT_GRACE
    r = gc.collect(disk, given and given.bytes, dry_run=args.dry_run, grace=grace,
                   config_ttl=settings.stored_config_ttl)
    if args.json:
        print(json.dumps(_gc_json(disk.root, r), indent=2))
        return _gc_exit(r.under_quota, r.size_after, given)
    show = given.show if given else human_bytes  # sizes in the unit the user gave
    _print_disk_gc(r, verb, settings.stored_config_ttl, show)
    quota = f" (quota {given})" if given is not None else ""
    print(f"cache {disk.root}: {show(r.size_before)} before, "
          f"{show(r.size_after)} after{quota}; {verb} {counted(len(r.evicted), 'layer')}, "
          f"{show(r.freed)} freed")
    return _gc_exit(r.under_quota, r.size_after, given)


def _print_disk_gc(r, verb: str, config_ttl: float,  # r: gc.GcReport
                   show: Callable[[float], str]) -> None:
    from pipeline.progress import human_bytes, human_seconds

    for e in r.evicted:
        note = "" if e.freed or not e.size else "  (another name of the same file remains)"
        print(f"{verb} {e.digest}  {show(e.size)}  last used {when(e.last_used)}{note}")
    for x in r.skipped:
        print(f"kept {x.digest}  {show(x.size)}  {x.reason}")
    for x in r.swept:
        print(f"{'would sweep' if r.dry_run else 'swept'} {x.path}  {show(x.size)}")
    for d in r.adopted:
        print(f"adopted {d} (a file without a record: rehashed and recorded)")
    for d in r.dropped:
        print(f"{'would drop' if r.dry_run else 'dropped'} the record of {d} (its file is gone)")
    if r.configs_dropped:
        print(f"{'would drop' if r.dry_run else 'dropped'} "
              f"{counted(r.configs_dropped, 'stored image config')} "
              f"unused for {human_seconds(config_ttl)} "
              f"({human_bytes(r.config_bytes_dropped)}; LAYERWARM_STORED_CONFIG_TTL)")


def _gc_exit(under_quota: bool, size: int, quota: Size | None) -> int:
    if under_quota or quota is None:
        return EXIT_OK
    print(f"layerwarm: still {quota.show(size)}, above the quota of {quota}: what is left is "
          "pinned or in use", file=sys.stderr)
    return EXIT_FAILED


def cmd_pin(args: argparse.Namespace) -> int:
    from pipeline import pins
    from pipeline.tiers.disk import DiskTier
    from pipeline.units import parse_duration

    settings = settings_of(args)
    if args.list:
        if args.refs or args.file:
            raise UsageError("pin --list takes no image references")
        found = DiskTier(settings.cache_dir, read_only=True).meta.pins()
        if args.json:
            print(json.dumps([{"layer": d, "ref": ref, "until": when(until)}
                              for d, ref, until in found], indent=2))
        elif found:
            rows = [(d, ref, when(until)) for d, ref, until in found]
            print("\n".join(table(("LAYER", "REF", "PINNED UNTIL"), rows)))
        else:
            print("no pins")
        return EXIT_OK
    if not args.ttl:
        raise UsageError("pin needs --ttl DURATION (e.g. --ttl 6h), or --list")
    ttl = parse_duration(args.ttl, "--ttl")
    refs, platform = read_refs(args), platform_arg(args)
    done, failures = pins.pin(refs, ttl, settings, platform=platform)
    if args.json:
        print(json.dumps({"pinned": [{"ref": p.ref, "until": when(p.until), "source": p.source,
                                      "layers": [str(d) for d in p.layers]} for p in done],
                          "failed": [{"ref": f.ref, "error": f.error} for f in failures]},
                         indent=2))
    else:
        for p in done:
            how = " (offline: the layers a warm recorded)" if p.source == "recorded" else ""
            print(f"pinned {p.ref}: {counted(len(p.layers), 'layer')} until {when(p.until)}{how}")
    for f in failures:
        print(f"error: {f.ref}: {f.error}", file=sys.stderr)
    return EXIT_FAILED if failures else EXIT_OK


def cmd_unpin(args: argparse.Namespace) -> int:
    from pipeline.tiers.disk import DiskTier

    meta = DiskTier(settings_of(args).cache_dir).meta
    failed = False
    for ref in read_refs(args):
        count = meta.unpin(str(ref))
        if count:
            print(f"unpinned {ref}: {counted(count, 'layer')}")
        else:
            failed = True
            print(f"error: {ref}: not pinned", file=sys.stderr)
    return EXIT_FAILED if failed else EXIT_OK


def register(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("gc", help="evict least recently used layers until under a quota; "
                       "sweep old temp files")
    g.add_argument("--max-size", metavar="SIZE",
                   help="quota, e.g. 200G, 512M, 1.5GiB (env LAYERWARM_MAX_CACHE_SIZE)")
    g.add_argument("--dry-run", action="store_true", help="say what would go, change nothing")
    g.add_argument("--grace", metavar="DURATION",
                   help="sweep .tmp/.staging files older than this (default 1h)")
    g.add_argument("--remote", nargs="?", const="", metavar="URL",
                   help="collect the remote tier instead (default URL: LAYERWARM_REMOTE)")
    g.add_argument("--older-than", metavar="DURATION",
                   help="with --remote: evict layers stored longer ago than this, e.g. 30d")
    g.add_argument("--cache-dir", metavar="DIR", help="disk tier (env LAYERWARM_CACHE_DIR)")
    g.add_argument("--json", action="store_true", help="print the result as JSON")
    g.set_defaults(func=cmd_gc, insecure_registry=[], io_threads=None, cpu_threads=None)

    p = sub.add_parser("pin", help="protect images' layers from gc for a while (--list: pins)")
    image_args(p)
    p.add_argument("--ttl", metavar="DURATION", help="how long, e.g. 6h, 2d, 1h30m")
    p.add_argument("--list", action="store_true", help="list the pins in force")
    p.set_defaults(func=cmd_pin)

    u = sub.add_parser("unpin", help="drop the pins of images")
    u.add_argument("refs", nargs="+", metavar="IMAGE", help="image reference, as pinned")
    u.add_argument("--cache-dir", metavar="DIR", help="disk tier (env LAYERWARM_CACHE_DIR)")
    u.set_defaults(func=cmd_unpin, file=None, remote=None, insecure_registry=[],
                   io_threads=None, cpu_threads=None)
