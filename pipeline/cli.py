"""The `layerwarm` command.

Exit codes follow the usual convention: 0 everything warm, 1 something failed (each
failure printed with its reason), 2 usage errors (bad flags, references or settings).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.config import Settings
from pipeline.errors import LayerwarmError, UsageError

if TYPE_CHECKING:  # imported where used, so commands that do not need it start fast
    from pipeline.layer import Progress
    from pipeline.manifest import Platform
    from pipeline.reference import Reference
    from pipeline.stats import HitRatio

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def read_refs(args: argparse.Namespace) -> list[Reference]:
    """Refs from the command line and `-f` files (one a line, `#` comments); strict."""
    from pipeline.reference import Reference

    items: list[tuple[str, str]] = [("argument", r) for r in args.refs]
    for name in args.file or []:
        try:
            text = sys.stdin.read() if name == "-" else Path(name).read_text(encoding="utf-8")
        except OSError as e:
            raise UsageError(f"cannot read {name}: {e.strerror}") from None
        except UnicodeDecodeError as e:
            raise UsageError(f"cannot read {name}: not UTF-8 text (byte {e.start})") from None
        # Lines end at \n only: str.splitlines() would also split at control characters
        # such as \x1e, turning one hostile line into two references.
        for n, line in enumerate(text.split("\n"), 1):
            line = line.removesuffix("\r")
            line = line.split("#", 1)[0].strip()
            if line:
                items.append((f"{name}:{n}", line))
    if not items:
        raise UsageError("no image references given (pass IMAGE... or -f FILE)")
    refs = []
    for where, text in items:
        try:
            refs.append(Reference.parse(text))
        except LayerwarmError as e:
            raise UsageError(f"{where}: {e}") from None
    return refs


def _settings(args: argparse.Namespace) -> Settings:
    return Settings.from_env().with_overrides(
        cache_dir=Path(args.cache_dir) if args.cache_dir else None,
        remote_url=args.remote,
        io_threads=args.io_threads,
        cpu_threads=args.cpu_threads,
        insecure_registries=(
            tuple(Settings.from_env().insecure_registries) + tuple(args.insecure_registry)
            if args.insecure_registry else None
        ),
    )


def platform_arg(args: argparse.Namespace) -> Platform | None:
    from pipeline.manifest import Platform

    if args.all_platforms:
        return None
    try:
        return Platform.parse(args.platform) if args.platform else Platform.host()
    except LayerwarmError as e:
        raise UsageError(str(e)) from None


@contextmanager
def _long_lived() -> Iterator[None]:
    """Make what lives until the process ends (a command's modules) outside the cyclic GC.

    The collector is off in the block, and what exists at its end is frozen (gc.freeze):
    the tens of thousands of objects that importing requests, SQLite and the stages makes
    are then never walked again, neither by the run's collections nor by the one at exit.
    What the command makes afterwards is collected as usual.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


def cmd_warm(args: argparse.Namespace) -> int:
    with _long_lived():
        from pipeline import report, runner
        from pipeline.layer import NO_PROGRESS
        from pipeline.progress import TerminalProgress

    refs, settings, platform = read_refs(args), _settings(args), platform_arg(args)
    bars = sys.stderr.isatty() and not args.json and not args.verbose
    progress: Progress = TerminalProgress(sys.stderr) if bars else NO_PROGRESS
    try:
        result = runner.warm(refs, settings, platform=platform, progress=progress)
    finally:
        if isinstance(progress, TerminalProgress):
            progress.close()
    if args.json:
        print(json.dumps(report.warm_json(result), indent=2))
    else:
        print(report.warm_text(result))
    for line in report.failure_lines(result):
        print(line, file=sys.stderr)
    return EXIT_OK if result.ok else EXIT_FAILED


def cmd_plan(args: argparse.Namespace) -> int:
    with _long_lived():
        from pipeline import report, runner

    refs, settings, platform = read_refs(args), _settings(args), platform_arg(args)
    plan, where = runner.plan_only(refs, settings, platform=platform)
    if args.json:
        print(json.dumps(report.plan_json(plan, where), indent=2))
    else:
        print(report.plan_text(plan, where))
    for f in plan.failures:
        print(f"error: {f.ref}: {f.error}", file=sys.stderr)
    return EXIT_FAILED if plan.failures else EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    from pipeline.digest import Digest
    from pipeline.tiers.disk import DiskTier
    from pipeline.tiers.remote import open_remote
    from pipeline.verify import verify_disk, verify_remote

    settings = _settings(args)
    try:
        digests = [Digest.parse(d, allow_cache_name=True) for d in args.digests] or None
    except LayerwarmError as e:
        raise UsageError(str(e)) from None
    disk = DiskTier(settings.cache_dir)
    checked = verify_disk(disk, digests, report_only=args.report)
    if settings.remote_url:
        remote = open_remote(settings.remote_url)
        checked += verify_remote(remote, disk, digests, report_only=args.report)
    if args.json:
        print(json.dumps([{"digest": str(c.digest), "tier": c.tier, "state": c.state,
                           "reason": c.reason, "removed": c.removed} for c in checked], indent=2))
    else:
        for c in checked:
            note = f": {c.reason}" if c.reason else ""
            note += " (removed)" if c.removed else ""
            print(f"{c.state:<12} {c.tier:<6} {c.digest}{note}")
        counts = {k: sum(1 for c in checked if c.state == k)
                  for k in ("ok", "bad", "unverifiable", "missing")}
        print(f"{len(checked)} entries: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    return EXIT_FAILED if any(c.state in ("bad", "missing") for c in checked) else EXIT_OK


# ---------------------------------------------------------------- cache operations
# ls / inspect / usage / rm / df / metrics: the logic is pipeline/cacheops.py; this block prints.


def _when(t: float | None) -> str:
    from datetime import UTC, datetime

    return "-" if t is None else datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _cache(args: argparse.Namespace, *, remote_from_env: bool = True):  # -> (DiskTier, remote)
    from pipeline.tiers.disk import DiskTier
    from pipeline.tiers.remote import open_remote

    settings = _settings(args)
    url = settings.remote_url if remote_from_env else args.remote
    return DiskTier(settings.cache_dir), (open_remote(url) if url else None)


def _images_json(images) -> list[dict]:
    return [{"ref": i.ref, "manifest_digest": i.manifest_digest, "platform": i.platform}
            for i in images]


def _entry_json(e) -> dict:
    return {"digest": str(e.digest), "size": e.size, "tiers": list(e.tiers),
            "disk_size": e.disk_size, "remote_size": e.remote_size, "diff_id": e.diff_id,
            "media_type": e.media_type, "compressed_size": e.compressed_size,
            "uncompressed_size": e.uncompressed_size,
            "created": None if e.created is None else _when(e.created),
            "last_used": None if e.last_used is None else _when(e.last_used),
            "pinned_until": None if e.pinned_until is None else _when(e.pinned_until),
            "images": _images_json(e.images)}


def cmd_ls(args: argparse.Namespace) -> int:
    from pipeline import cacheops
    from pipeline.progress import human_bytes
    from pipeline.report import _table

    disk, remote = _cache(args)
    found = cacheops.list_entries(disk, remote)
    if args.json:
        print(json.dumps([_entry_json(e) for e in found], indent=2))
        return EXIT_OK
    rows = [(str(e.digest), human_bytes(e.size), _when(e.last_used), "+".join(e.tiers),
             str(e.image_count)) for e in found]
    header: tuple[str, ...] = ("LAYER", "SIZE", "LAST USED", "TIERS", "IMAGES")
    if any(e.pinned_until is not None for e in found):  # the column only when there are pins
        header += ("PINNED UNTIL",)
        rows = [(*r, _when(e.pinned_until)) for r, e in zip(rows, found, strict=True)]
    print("\n".join(_table(header, rows, {1, 4})))
    total = sum(e.size for e in found)
    print(f"{len(found)} entries, {human_bytes(total)}")
    return EXIT_OK


def cmd_inspect(args: argparse.Namespace) -> int:
    from pipeline import cacheops
    from pipeline.progress import human_bytes
    from pipeline.report import _table

    [digest] = cacheops.parse_digests([args.digest])
    disk, remote = _cache(args)
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
              ("created", _when(entry.created)), ("last used", _when(entry.last_used))]
    if entry.pinned_until is not None:
        fields.append(("pinned until", _when(entry.pinned_until)))
    fields += [("tier", w) for w in where]
    fields += [("shares with", f"{d} (same file, same diff_id)")
               for d in cacheops.shares_with(disk, digest)]
    for name, value in fields:
        print(f"{name:<13} {value}")
    print(f"{'images':<13} {entry.image_count}")
    if entry.images:
        rows = [(i.ref, i.manifest_digest, i.platform or "-") for i in entry.images]
        print("\n".join("  " + line for line in _table(("REF", "MANIFEST", "PLATFORM"), rows,
                                                          set())))
    return EXIT_OK


def cmd_usage(args: argparse.Namespace) -> int:
    from pipeline import cacheops
    from pipeline.report import _table

    [digest] = cacheops.parse_digests([args.digest])
    disk, _ = _cache(args, remote_from_env=False)
    images = cacheops.usage(disk, digest)
    cached = disk.has(digest)
    if args.json:
        print(json.dumps({"digest": str(digest), "cached": cached,
                          "images": _images_json(images)}, indent=2))
        return EXIT_OK
    if images:
        rows = [(i.ref, i.manifest_digest, i.platform or "-") for i in images]
        print("\n".join(_table(("REF", "MANIFEST", "PLATFORM"), rows, set())))
    state = "on disk" if cached else "not on disk"
    print(f"{len({i.manifest_digest for i in images})} images use {digest} ({state})")
    return EXIT_OK


def cmd_rm(args: argparse.Namespace) -> int:
    from pipeline import cacheops

    digests = cacheops.parse_digests(args.digests)
    disk, remote = _cache(args, remote_from_env=False)  # the remote only when asked for

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
    if args.json:
        print(json.dumps({"cache_dir": str(disk.root), "entries": t.entries, "bytes": t.bytes,
                          "images": t.images, "shared_entries": t.shared_entries,
                          "referenced_bytes": t.referenced_bytes,
                          "saved_bytes": t.saved_bytes, **_hit_ratio_json(hits),
                          **_sharing_json(sharing)}, indent=2))
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


def _cache_commands(sub: argparse._SubParsersAction) -> None:
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

    digest_help = "sha256:<hex> or sha256_<hex>"
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
    add("df", cmd_df, "totals: entries, bytes, bytes saved by sharing layers, hit ratio")
    add("metrics", cmd_metrics, "Prometheus text: hits, misses, bytes, seconds, cache size",
        json_out=False)


# ---------------------------------------------------------------- end of cache operations


# ---------------------------------------------------------------- gc and pins
# gc / pin / unpin: the logic is pipeline/gc.py and pipeline/pins.py; this block prints.


def _gc_json(disk_root: Path, r) -> dict:
    return {"cache_dir": str(disk_root), "dry_run": r.dry_run, "max_size": r.target,
            "size_before": r.size_before, "size_after": r.size_after, "freed": r.freed,
            "under_quota": r.under_quota,
            "evicted": [{"digest": str(e.digest), "size": e.size, "freed": e.freed,
                         "last_used": _when(e.last_used)} for e in r.evicted],
            "skipped": [{"digest": str(x.digest), "size": x.size, "reason": x.reason}
                        for x in r.skipped],
            "swept": [{"path": x.path, "size": x.size} for x in r.swept],
            "adopted": [str(d) for d in r.adopted], "dropped": [str(d) for d in r.dropped]}


def _remote_gc_json(url: str, r) -> dict:
    return {"remote": url, "dry_run": r.dry_run, "max_size": r.max_size,
            "older_than": r.older_than, "size_before": r.size_before,
            "size_after": r.size_after, "freed": r.freed, "under_quota": r.under_quota,
            "evicted": [{"digest": str(e.digest), "size": e.size,
                         "modified": _when(e.modified)} for e in r.evicted],
            "pinned": [str(d) for d in r.pinned]}


def cmd_gc(args: argparse.Namespace) -> int:
    from pipeline import gc
    from pipeline.progress import human_bytes
    from pipeline.tiers.disk import DiskTier
    from pipeline.tiers.remote import open_remote
    from pipeline.units import parse_duration, parse_size

    settings = _settings(args)
    max_size = parse_size(args.max_size, "--max-size") if args.max_size else None
    verb = "would evict" if args.dry_run else "evicted"
    disk = DiskTier(settings.cache_dir)
    if args.remote is not None:
        url = args.remote or Settings.from_env().remote_url  # bare --remote: the env's
        if not url:
            raise UsageError("gc --remote: no remote tier (give --remote URL or LAYERWARM_REMOTE)")
        older = parse_duration(args.older_than, "--older-than") if args.older_than else None
        if max_size is None and older is None:
            raise UsageError("gc --remote needs --max-size and/or --older-than")
        remote = open_remote(url)
        rr = gc.collect_remote(remote, max_size=max_size, older_than=older,
                               dry_run=args.dry_run, disk=disk)
        if args.json:
            print(json.dumps(_remote_gc_json(remote.url, rr), indent=2))
        else:
            for e in rr.evicted:
                print(f"{verb} {e.digest}  {human_bytes(e.size)}  stored {_when(e.modified)}")
            for d in rr.pinned:
                print(f"kept {d}  pinned")
            print(f"remote {remote.url}: {human_bytes(rr.size_before)} before, "
                  f"{human_bytes(rr.size_after)} after; {verb} {len(rr.evicted)} layers, "
                  f"{human_bytes(rr.freed)}")
        return _gc_exit(rr.under_quota, rr.size_after, max_size)
    if args.older_than:
        raise UsageError("--older-than applies to the remote tier (gc --remote)")
    if max_size is None:
        max_size = settings.max_cache_size  # LAYERWARM_MAX_CACHE_SIZE; None: housekeeping only
    grace = parse_duration(args.grace, "--grace") if args.grace else gc.DEFAULT_GRACE
    r = gc.collect(disk, max_size, dry_run=args.dry_run, grace=grace)
    if args.json:
        print(json.dumps(_gc_json(disk.root, r), indent=2))
        return _gc_exit(r.under_quota, r.size_after, max_size)
    for e in r.evicted:
        note = "" if e.freed or not e.size else "  (another name of the same file remains)"
        print(f"{verb} {e.digest}  {human_bytes(e.size)}  last used {_when(e.last_used)}{note}")
    for x in r.skipped:
        print(f"kept {x.digest}  {human_bytes(x.size)}  {x.reason}")
    for x in r.swept:
        print(f"{'would sweep' if r.dry_run else 'swept'} {x.path}  {human_bytes(x.size)}")
    for d in r.adopted:
        print(f"adopted {d} (a file without a record: rehashed and recorded)")
    for d in r.dropped:
        print(f"{'would drop' if r.dry_run else 'dropped'} the record of {d} (its file is gone)")
    quota = f" (quota {human_bytes(max_size)})" if max_size is not None else ""
    print(f"cache {disk.root}: {human_bytes(r.size_before)} before, "
          f"{human_bytes(r.size_after)} after{quota}; {verb} {len(r.evicted)} layers, "
          f"{human_bytes(r.freed)} freed")
    return _gc_exit(r.under_quota, r.size_after, max_size)


def _gc_exit(under_quota: bool, size: int, max_size: int | None) -> int:
    if under_quota:
        return EXIT_OK
    print(f"layerwarm: still {size} bytes, above the quota of {max_size}: what is left is "
          "pinned or in use", file=sys.stderr)
    return EXIT_FAILED


def cmd_pin(args: argparse.Namespace) -> int:
    from pipeline import pins
    from pipeline.report import _table
    from pipeline.tiers.disk import DiskTier
    from pipeline.units import parse_duration

    settings = _settings(args)
    if args.list:
        if args.refs or args.file:
            raise UsageError("pin --list takes no image references")
        found = DiskTier(settings.cache_dir).meta.pins()
        if args.json:
            print(json.dumps([{"layer": d, "ref": ref, "until": _when(until)}
                              for d, ref, until in found], indent=2))
        elif found:
            rows = [(d, ref, _when(until)) for d, ref, until in found]
            print("\n".join(_table(("LAYER", "REF", "PINNED UNTIL"), rows, set())))
        else:
            print("no pins")
        return EXIT_OK
    if not args.ttl:
        raise UsageError("pin needs --ttl DURATION (e.g. --ttl 6h), or --list")
    ttl = parse_duration(args.ttl, "--ttl")
    refs, platform = read_refs(args), platform_arg(args)
    done, failures = pins.pin(refs, ttl, settings, platform=platform)
    if args.json:
        print(json.dumps({"pinned": [{"ref": p.ref, "until": _when(p.until), "source": p.source,
                                      "layers": [str(d) for d in p.layers]} for p in done],
                          "failed": [{"ref": f.ref, "error": f.error} for f in failures]},
                         indent=2))
    else:
        for p in done:
            how = " (offline: the layers a warm recorded)" if p.source == "recorded" else ""
            print(f"pinned {p.ref}: {len(p.layers)} layers until {_when(p.until)}{how}")
    for f in failures:
        print(f"error: {f.ref}: {f.error}", file=sys.stderr)
    return EXIT_FAILED if failures else EXIT_OK


def cmd_unpin(args: argparse.Namespace) -> int:
    from pipeline.tiers.disk import DiskTier

    meta = DiskTier(_settings(args).cache_dir).meta
    failed = False
    for ref in read_refs(args):
        count = meta.unpin(str(ref))
        if count:
            print(f"unpinned {ref}: {count} layers")
        else:
            failed = True
            print(f"error: {ref}: not pinned", file=sys.stderr)
    return EXIT_FAILED if failed else EXIT_OK


def _gc_commands(sub: argparse._SubParsersAction) -> None:
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


# ---------------------------------------------------------------- end of gc and pins


def image_args(p: argparse.ArgumentParser, *, local: bool = True) -> None:
    """Which images (and, for commands that work here rather than on workers, where)."""
    p.add_argument("refs", nargs="*", metavar="IMAGE", help="image reference, e.g. alpine:3.19")
    p.add_argument("-f", "--file", action="append", metavar="FILE",
                   help="read references from FILE, one a line, '#' comments ('-' for stdin)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--platform", metavar="OS/ARCH[/VARIANT]",
                       help="platform to pick from multi-platform images (default: this host's)")
    group.add_argument("--all-platforms", action="store_true",
                       help="every platform of multi-platform images")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    if not local:
        return
    p.add_argument("--remote", metavar="URL",
                   help="shared tier: s3://bucket/prefix or file:///path (env LAYERWARM_REMOTE)")
    p.add_argument("--cache-dir", metavar="DIR", help="disk tier (env LAYERWARM_CACHE_DIR)")
    p.add_argument("--insecure-registry", action="append", default=[], metavar="HOST[:PORT]",
                   help="allow plain HTTP to this registry (env LAYERWARM_INSECURE_REGISTRIES)")
    p.add_argument("--io-threads", type=int, metavar="N", help="fetch/publish threads")
    p.add_argument("--cpu-threads", type=int, metavar="N", help="decompress threads")
    p.add_argument("-v", "--verbose", action="store_true", help="log every event, no bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="layerwarm",
        description="Prewarm container image layers as decompressed tars on local disk "
        "and a shared blob store.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    warm = sub.add_parser("warm", help="fetch, verify and cache every layer of images")
    image_args(warm)
    warm.set_defaults(func=cmd_warm)
    plan = sub.add_parser("plan", help="dry run: unique layers, where each is, bytes to fetch")
    image_args(plan)
    plan.set_defaults(func=cmd_plan)
    verify = sub.add_parser("verify", help="re-hash cache entries; remove (or report) bad ones")
    verify.add_argument("digests", nargs="*", metavar="DIGEST",
                        help="sha256:<hex> or sha256_<hex> (default: every entry)")
    verify.add_argument("--report", action="store_true", help="list bad entries, remove nothing")
    verify.add_argument("--remote", metavar="URL", help="check the remote tier too")
    verify.add_argument("--cache-dir", metavar="DIR", help="disk tier (env LAYERWARM_CACHE_DIR)")
    verify.add_argument("--json", action="store_true", help="print the result as JSON")
    verify.set_defaults(func=cmd_verify, insecure_registry=[], io_threads=None, cpu_threads=None)
    _cache_commands(sub)  # ls, inspect, usage, rm, df, metrics
    _gc_commands(sub)  # gc, pin, unpin
    return parser


def _setup_logging(args: argparse.Namespace) -> None:
    # One line per event when nobody watches bars; on a terminal the bars replace them.
    quiet = sys.stderr.isatty() and not getattr(args, "verbose", False)
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("botocore", "boto3", "s3transfer", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    """Parse, run the command, and turn errors into one line and an exit code."""
    args = parser.parse_args(argv)
    _setup_logging(args)
    for name in ("io_threads", "cpu_threads", "io_concurrency", "cpu_concurrency"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    try:
        return int(args.func(args))
    except UsageError as e:
        print(f"layerwarm: {e}", file=sys.stderr)
        return EXIT_USAGE
    except LayerwarmError as e:
        print(f"layerwarm: {e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("layerwarm: interrupted", file=sys.stderr)
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
