"""The `layerwarm` command: the embedded commands (workers/cli/ adds distributed mode).

Each module registers its own subcommands and prints their results; the logic lives in
the pipeline modules they call, imported inside each command so that start-up stays fast:
    warm.py     warm, plan, verify
    cache.py    ls, inspect, usage, rm, df, metrics
    gc.py       gc, pin, unpin
    files.py    files, cat, export, mount
    common.py   exit codes, image arguments, settings, times: what they share

Exit codes follow the usual convention: 0 everything warm, 1 something failed (each
failure printed with its reason), 2 usage errors (bad flags, references or settings).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any, cast

from pipeline.cli import cache, files, gc, warm
from pipeline.cli.common import (  # re-exported: workers/cli/ builds on them
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    image_args,
    platform_arg,
    read_refs,
)
from pipeline.errors import LayerwarmError, UsageError

__all__ = ["EXIT_FAILED", "EXIT_OK", "EXIT_USAGE", "build_parser", "command_of", "image_args",
           "main", "platform_arg", "read_refs", "run"]


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole command line, or, given the `command` about to run, that command's options
    only: the others are listed (in --help, in "invalid choice" errors) but not built
    (`_Commands`)."""
    parser = argparse.ArgumentParser(
        prog="layerwarm",
        description="Prewarm container image layers as decompressed tars on local disk "
        "and a shared blob store.",
    )
    parser.add_argument("--version", action=_VersionAction, nargs=0,
                        help="print layerwarm's version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=_CommandParser, action=_Commands)
    sub.only = command
    warm.register(sub)  # warm, plan, verify
    cache.register(sub)  # ls, inspect, usage, rm, df, metrics
    gc.register(sub)  # gc, pin, unpin
    files.register(sub)  # files, cat, export, mount
    return parser


def command_of(argv: Sequence[str] | None) -> str | None:
    """The command an argv runs: its first operand (the only options before it, --help and
    --version, take no value). None when there is none."""
    args = sys.argv[1:] if argv is None else argv
    return next((a for a in args if not a.startswith("-")), None)


class _Commands(argparse._SubParsersAction):
    """Subcommands of which only `only` (when set) gets a parser built.

    A command line runs one command, and building every command's parser cost `warm`
    ~10 ms of a 0.25 s run (each parser looks up its titles' translations, stat()ing
    locale files, and each option is checked as it is added) for 23 commands it would
    not run. The others are only named, with their help: `layerwarm --help` and an
    "invalid choice" error list them all.
    """

    only: str | None = None

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        if self.only is None or name == self.only:
            return super().add_parser(name, **kwargs)
        if "help" in kwargs:  # as argparse lists a command: only one given a help
            self._choices_actions.append(self._ChoicesPseudoAction(name, (), kwargs["help"]))
        self._name_parser_map[name] = unbuilt = _Unbuilt()
        return cast(argparse.ArgumentParser, unbuilt)  # takes the calls registering makes


class _Unbuilt:
    """A command not on this command line: what registering it would add is dropped."""

    def add_argument(self, *args: Any, **kwargs: Any) -> None:
        pass

    def add_argument_group(self, *args: Any, **kwargs: Any) -> _Unbuilt:
        return self

    def add_mutually_exclusive_group(self, *args: Any, **kwargs: Any) -> _Unbuilt:
        return self

    def set_defaults(self, **kwargs: Any) -> None:
        pass


class _CommandParser(argparse.ArgumentParser):
    """A subcommand's parser that takes its options anywhere among its operands, as
    skopeo, crane and GNU tools do: `files IMAGE -R /etc`, `cat IMAGE /a --platform P /b`.

    Plain argparse takes all of a command's positionals from the first run of operands,
    so an operand after an option was "unrecognized"; parse_known_intermixed_args sorts
    options out first. It calls parse_known_args again itself (up to Python 3.12), hence
    the flag.
    """

    _intermixing = False

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[no-untyped-def]
        if self._intermixing:
            return super().parse_known_args(args, namespace)
        self._intermixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


class _VersionAction(argparse.Action):
    """`--version`: `layerwarm <version>` from the installed package's metadata.

    Read only when asked (not with action="version"): importlib.metadata is not free, and
    `warm` is a short process whose start-up is part of its run time.
    """

    def __call__(self, parser: argparse.ArgumentParser, *_args: object, **_kw: object) -> None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            text = version("layerwarm")
        except PackageNotFoundError:  # run from a checkout that was never installed
            text = "unknown (not installed; pip install .)"
        print(f"layerwarm {text}")
        parser.exit(EXIT_OK)


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
    return run(build_parser(command_of(argv)), argv)
