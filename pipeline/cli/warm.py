"""warm, plan and verify: the commands that work on images and entries on this machine."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from pipeline.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    image_args,
    long_lived,
    platform_arg,
    read_refs,
    settings_of,
)

if TYPE_CHECKING:
    from pipeline.layer import Progress


def cmd_warm(args: argparse.Namespace) -> int:
    with long_lived():
        from pipeline import report, runner
        from pipeline.layer import NO_PROGRESS
        from pipeline.progress import TerminalProgress

    refs, settings, platform = read_refs(args), settings_of(args), platform_arg(args)
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
    with long_lived():
        from pipeline import report, runner

    refs, settings, platform = read_refs(args), settings_of(args), platform_arg(args)
    plan, where = runner.plan_only(refs, settings, platform=platform)
    if args.json:
        print(json.dumps(report.plan_json(plan, where), indent=2))
    else:
        print(report.plan_text(plan, where))
    for f in plan.failures:
        print(f"error: {f.ref}: {f.error}", file=sys.stderr)
    return EXIT_FAILED if plan.failures else EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    from pipeline.cacheops import resolve_digests
    from pipeline.table import counted
    from pipeline.tiers.disk import DiskTier
    from pipeline.tiers.remote import open_remote
    from pipeline.verify import verify_disk, verify_remote

    settings = settings_of(args)
    disk = DiskTier(settings.cache_dir, read_only=args.report)  # --report changes nothing
    digests = resolve_digests(disk, args.digests) or None
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
        tally = ", ".join(f"{v} {k}" for k, v in counts.items())
        print(f"{counted(len(checked), 'entry')}: {tally}")
    return EXIT_FAILED if any(c.state in ("bad", "missing") for c in checked) else EXIT_OK


def register(sub: argparse._SubParsersAction) -> None:
    warm = sub.add_parser("warm", help="fetch, verify and cache every layer of images")
    image_args(warm)
    warm.set_defaults(func=cmd_warm)
    plan = sub.add_parser("plan", help="dry run: unique layers, where each is, bytes to fetch")
    image_args(plan)
    plan.set_defaults(func=cmd_plan)
    verify = sub.add_parser("verify", help="re-hash cache entries; remove (or report) bad ones")
    verify.add_argument("digests", nargs="*", metavar="DIGEST",
                        help="sha256:<hex>, sha256_<hex> or a unique 12+ hex prefix "
                        "(default: every entry)")
    verify.add_argument("--report", action="store_true", help="list bad entries, remove nothing")
    verify.add_argument("--remote", metavar="URL", help="check the remote tier too")
    verify.add_argument("--cache-dir", metavar="DIR", help="disk tier (env LAYERWARM_CACHE_DIR)")
    verify.add_argument("--json", action="store_true", help="print the result as JSON")
    verify.set_defaults(func=cmd_verify, insecure_registry=[], io_threads=None, cpu_threads=None)
