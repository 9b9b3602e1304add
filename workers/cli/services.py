"""flower and beat: the fleet's services that run beside its worker hosts."""

from __future__ import annotations

import argparse
import os
import sys

from pipeline.cli.common import EXIT_FAILED
from workers.cli import Subparsers, _broker_env, _command, secret_flags
from workers.credentials import FLOWER_AUTH_ENV, FLOWER_OWN_ENV, flower_logins


def cmd_flower(args: argparse.Namespace) -> int:
    _broker_env(args)
    logins = flower_logins(args.basic_auth, args.basic_auth_file, os.environ)
    argv = [sys.executable, "-m", "celery", "-A", "workers.app", "flower",
            f"--address={args.address}", f"--port={args.port}"]
    # The logins go by environment (Flower reads FLOWER_* variables), never on the command
    # line: /proc/PID/cmdline is readable by every user of the machine.
    env = {k: v for k, v in os.environ.items() if k != FLOWER_AUTH_ENV}
    if logins:
        env[FLOWER_OWN_ENV] = logins
    else:
        _warn_open_flower(args.address, args.port)
    os.execve(sys.executable, argv, env)
    return EXIT_FAILED  # not reached


def _warn_open_flower(address: str, port: int) -> None:
    """Flower without a login shows every job's images and lets anyone who reaches it
    revoke tasks and stop workers: say so once, before it starts."""
    print(f"layerwarm: warning: Flower serves http://{address}:{port} without login; anyone "
          "who can reach it can watch and control the workers (set "
          f"{FLOWER_AUTH_ENV} or --basic-auth-file)", file=sys.stderr, flush=True)


def cmd_beat(args: argparse.Namespace) -> int:
    """Run Celery beat: every LAYERWARM_GC_INTERVAL it has each live node run gc."""
    import tempfile

    _broker_env(args)
    from workers.app import GC_INTERVAL  # a bad LAYERWARM_GC_INTERVAL fails here, clearly

    schedule = args.schedule or os.path.join(tempfile.gettempdir(),
                                             f"layerwarm-beat-{os.getuid()}")
    print(f"layerwarm: beat: gc on every node each {GC_INTERVAL:.0f}s; state in {schedule}",
          file=sys.stderr, flush=True)
    argv = [sys.executable, "-m", "celery", "-A", "workers.app", "beat", "-l", args.loglevel,
            "-s", schedule]
    os.execv(sys.executable, argv)
    return EXIT_FAILED  # not reached


def register(sub: Subparsers) -> None:
    f = _command(sub, "flower", cmd_flower, "run Flower, Celery's web monitor, for this app")
    f.add_argument("--address", default="127.0.0.1",
                   help="address to serve on (127.0.0.1: this machine only)")
    f.add_argument("--port", type=int, default=5555)
    secret_flags(f, "--basic-auth", "USER:PASSWORD",
                 "protect the UI and API. Visible to every user of this machine (ps): prefer "
                 "env LAYERWARM_FLOWER_BASIC_AUTH (or FLOWER_BASIC_AUTH) or --basic-auth-file",
                 "read USER:PASSWORD (one a line) from this file")

    b = _command(sub, "beat", cmd_beat,
                 "run the scheduler that has every node run gc (one per fleet)")
    b.add_argument("--schedule", metavar="FILE",
                   help="where beat keeps its last run times (default: in the temp dir)")
    b.add_argument("--loglevel", default="info", help="Celery log level (info)")
