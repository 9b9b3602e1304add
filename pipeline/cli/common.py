"""What the `layerwarm` commands share: exit codes, image arguments, settings, times.

Imported by every command module of pipeline.cli and by workers/cli/, so it imports only
what all of them need; a command imports its heavy modules inside its function.
"""

from __future__ import annotations

import argparse
import functools
import gc
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.config import Settings
from pipeline.errors import LayerwarmError, UsageError

if TYPE_CHECKING:  # imported where used, so commands that do not need it start fast
    from pipeline.manifest import Platform
    from pipeline.reference import Reference

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


def settings_of(args: argparse.Namespace) -> Settings:
    """Settings from the environment, with the command line's flags over them."""
    return Settings.from_env().with_overrides(
        cache_dir=Path(args.cache_dir) if args.cache_dir else None,
        remote_url=args.remote,
        authfile=Path(args.authfile) if getattr(args, "authfile", None) else None,
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
def long_lived() -> Iterator[None]:
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


def when(t: float | None) -> str:
    """A Unix time as UTC ISO 8601 to the second, "-" for none."""
    return "-" if t is None else _second(int(t // 1))


@functools.lru_cache(maxsize=4096)  # an image's files share few mtimes: `files -R` reuses them
def _second(t: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


# --authfile of the commands that talk to registries (warm, plan, pin, worker).
AUTHFILE_HELP = ("registry credentials, containers auth.json format (env REGISTRY_AUTH_FILE; "
                 "default $XDG_RUNTIME_DIR/containers/auth.json, then Docker's config.json)")


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
    if local:
        where_args(p)


def where_args(p: argparse.ArgumentParser) -> None:
    """Where a command that works on this machine finds layers: the tiers, the registry."""
    p.add_argument("--remote", metavar="URL",
                   help="shared tier: s3://bucket/prefix or file:///path (env LAYERWARM_REMOTE)")
    p.add_argument("--cache-dir", metavar="DIR", help="disk tier (env LAYERWARM_CACHE_DIR)")
    p.add_argument("--insecure-registry", action="append", default=[], metavar="HOST[:PORT]",
                   help="allow plain HTTP to this registry (env LAYERWARM_INSECURE_REGISTRIES)")
    p.add_argument("--authfile", metavar="PATH",
                   help=AUTHFILE_HELP)
    p.add_argument("--io-threads", type=int, metavar="N", help="fetch/publish threads")
    p.add_argument("--cpu-threads", type=int, metavar="N", help="decompress threads")
    p.add_argument("-v", "--verbose", action="store_true", help="log every event, no bars")
