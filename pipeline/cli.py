"""The `layerwarm` command.

Exit codes follow the usual convention: 0 everything warm, 1 something failed (each
failure printed with its reason), 2 usage errors (bad flags, references or settings).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from pipeline.config import Settings
from pipeline.errors import LayerwarmError, UsageError
from pipeline.manifest import Platform
from pipeline.progress import TerminalProgress
from pipeline.reference import Reference
from pipeline.stages import NO_PROGRESS, Progress

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def read_refs(args: argparse.Namespace) -> list[Reference]:
    """Refs from the command line and `-f` files (one a line, `#` comments); strict."""
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
    if args.all_platforms:
        return None
    try:
        return Platform.parse(args.platform) if args.platform else Platform.host()
    except LayerwarmError as e:
        raise UsageError(str(e)) from None


def cmd_warm(args: argparse.Namespace) -> int:
    from pipeline import report, runner

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
