"""The `layerwarm` command: the embedded commands of pipeline.cli plus distributed mode.

    layerwarm worker --node N      run one worker host: an IO and a CPU Celery worker
                                   (--metrics-port P: its cache in Prometheus text)
    layerwarm nodes                live worker hosts
    layerwarm submit IMAGE...      enqueue a prewarm job (prints its id; --wait follows it)
    layerwarm status JOB_ID        a job's layers, states, bytes, tiers, hosts
    layerwarm jobs                 recent jobs and their states
    layerwarm cancel JOB_ID        stop a job's layers that have not started
    layerwarm flower               Celery's web monitor for this app
    layerwarm beat                 the scheduler: gc on every node (LAYERWARM_GC_INTERVAL)

Each module registers its own subcommands, as pipeline/cli's do:
    worker.py     worker, nodes
    jobs.py       submit, status, jobs, cancel, and following a job to its end
    services.py   flower, beat
    __init__.py   the parser, main, and what they share: the broker flags, live_nodes

Celery and Redis are imported only by these commands, so `warm` and `plan` start fast and
need no broker. So are the modules only one command uses (signal, subprocess, tempfile,
uuid): `warm` is a short process whose start-up is part of its run time.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from pipeline import cli as base
from pipeline.cli.common import EXIT_FAILED
from workers.credentials import BROKER_ENV, resolve_broker_url


def _broker_env(args: argparse.Namespace) -> None:
    """Put the broker URL in LAYERWARM_BROKER_URL, where workers.app and every child read it.

    Set before workers.app is imported: the app reads its broker URL then. Children get
    it by environment, never on their command lines (see workers.credentials).
    """
    url = resolve_broker_url(getattr(args, "broker", None),
                             getattr(args, "broker_file", None), os.environ)
    if url:
        os.environ[BROKER_ENV] = url
    from workers.app import broker_url
    from workers.redisconn import check_broker

    check_broker(broker_url())  # one line now, not a trace (or endless retries) later


def live_nodes(timeout: float = 1.5) -> list[str]:
    """Worker hosts whose IO worker answers a ping.

    Only the hosts holding a node claim (workers/nodeclaim.py: every `layerwarm worker`
    does while it runs) are asked, by name, and the wait ends once they have all
    answered: a broadcast ping waited out its whole timeout for answers that might still
    come, and every `submit` paid that 1.5 s before sending its job. A host that does not
    answer still costs the timeout."""
    from workers.app import app, broker_url
    from workers.nodeclaim import claimed_nodes
    from workers.redisconn import connect

    client = connect(broker_url())
    try:
        asked = [f"io@{n}" for n in claimed_nodes(client)]
    finally:
        client.close()
    if not asked:
        return []
    replies = app.control.ping(asked, timeout=timeout, limit=len(asked)) or []
    names = {name for reply in replies for name in reply}
    return sorted(n.split("@", 1)[1] for n in names if n.startswith("io@"))


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The embedded commands (pipeline/cli) and the distributed ones, all on one parser;
    given `command`, only its options are built (pipeline.cli.build_parser)."""
    # Imported here, not above: they import _command, _broker_env and live_nodes from here.
    from workers.cli import jobs, services, worker

    parser = base.build_parser(command)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    worker.register(sub)  # worker, nodes
    jobs.register(sub)  # submit, status, jobs, cancel
    services.register(sub)  # flower, beat
    return parser


Subparsers = argparse._SubParsersAction  # what add_subparsers returns


def _command(sub: Subparsers, name: str, func: Callable[[argparse.Namespace], int],
             help: str) -> argparse.ArgumentParser:
    """A distributed command: it runs `func` and takes the broker's URL."""
    p = sub.add_parser(name, help=help)
    secret_flags(p, "--broker", "URL",
                 "Redis URL (env LAYERWARM_BROKER_URL, default redis://127.0.0.1:6379/0). A "
                 "password in it is visible to every user of this machine (ps); use the env "
                 "or --broker-file for that",
                 "read the Redis URL from this file (env LAYERWARM_BROKER_URL_FILE)")
    p.set_defaults(func=func)
    return p


def secret_flags(p: argparse.ArgumentParser, flag: str, metavar: str, value_help: str,
                 file_help: str) -> None:
    """`FLAG VALUE` or `FLAG-file PATH`, not both: a secret given by value is visible to
    every user of the machine (ps), so each such flag has a twin that reads a file."""
    g = p.add_mutually_exclusive_group()
    g.add_argument(flag, metavar=metavar, help=value_help)
    g.add_argument(f"{flag}-file", metavar="PATH", help=file_help)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return base.run(build_parser(base.command_of(argv)), argv)
    except Exception as e:
        # A broker that refuses us (wrong password, down) is a one-line error, not a
        # traceback; the URL is shown with its password masked.
        if type(e).__module__.partition(".")[0] not in ("redis", "kombu"):
            raise
        from kombu.utils.url import maybe_sanitize_url

        from workers.app import broker_url

        print(f"layerwarm: broker {maybe_sanitize_url(broker_url())}: {e}", file=sys.stderr)
        return EXIT_FAILED
