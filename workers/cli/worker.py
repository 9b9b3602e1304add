"""worker and nodes: run one worker host of the fleet, list the live ones."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import TYPE_CHECKING

from pipeline.cli.common import AUTHFILE_HELP, EXIT_FAILED, EXIT_OK
from pipeline.errors import LayerwarmError, UsageError
from workers.cli import Subparsers, _broker_env, _command, live_nodes

if TYPE_CHECKING:
    from pipeline.config import Settings


def cmd_nodes(args: argparse.Namespace) -> int:
    _broker_env(args)
    nodes = live_nodes()
    if args.json:
        print(json.dumps(nodes))
    elif nodes:
        print("\n".join(nodes))
    else:
        print("layerwarm: no live worker hosts", file=sys.stderr)
    return EXIT_OK


CPU_PREFETCH = 4  # messages per CPU slot a host's cpu@ worker holds (io@ holds 1)
MAX_RESTARTS = 5  # per child within RESTART_WINDOW seconds, then the host gives up
RESTART_WINDOW = 60.0


def _registry_env(args: argparse.Namespace, env: dict[str, str]) -> None:
    """The worker's registry flags, for its Celery workers: they read settings from `env`.

    `--authfile` becomes REGISTRY_AUTH_FILE (where registry/credentials.py looks next), read
    once here so a wrong path is said before the host starts, not once per layer;
    `--insecure-registry` adds to LAYERWARM_INSECURE_REGISTRIES, as it does for `warm`.
    """
    from pathlib import Path

    from pipeline.registry.credentials import DockerConfig

    if args.authfile:
        path = Path(args.authfile).absolute()
        DockerConfig.read(path, "auth file", missing_ok=False)
        env["REGISTRY_AUTH_FILE"] = str(path)
    if args.insecure_registry:
        listed = env.get("LAYERWARM_INSECURE_REGISTRIES", "")
        env["LAYERWARM_INSECURE_REGISTRIES"] = ",".join(
            [h for h in listed.split(",") if h.strip()] + args.insecure_registry)


def cmd_worker(args: argparse.Namespace) -> int:
    """Run the IO and the CPU worker of one host.

    A Celery worker that exits on its own with an error (it gives up after some broker
    hiccups) is started again, a few times a minute at most. One killed by a signal (an
    operator, the OOM killer) or failing too often stops the whole host: a host with half
    its pools is no host, and the host's own supervisor decides what happens next.
    """
    from workers.routing import check_node

    node = check_node(args.node)
    _broker_env(args)  # the IO and CPU workers get the URL by environment, not argv
    env = _worker_env(args, node)
    settings = _preflight(env)  # before the claim: a host that cannot work never shows
    run = _claim_node(node)
    env["LAYERWARM_NODE_RUN"] = run
    env["LAYERWARM_SUPERVISOR_PID"] = str(os.getpid())  # its workers stop when it dies
    commands = _celery_commands(args, node, settings)
    if args.metrics_port is not None:
        serve_metrics(env, args.metrics_address, args.metrics_port)
    return _supervise(commands, env)


def _preflight(env: dict[str, str]) -> Settings:
    """Refuse, in one line, settings the host's workers could not work with: a cache
    directory they cannot write, registry credentials they cannot read, a remote tier that
    does not answer or refuses them. Without this a worker started, was listed by `nodes`,
    and failed every task sent to it while its jobs waited."""
    from pipeline.config import Settings
    from pipeline.errors import RemoteTierUnavailable, Unauthorized
    from pipeline.registry.credentials import CredentialSources
    from pipeline.tiers.disk import DiskTier
    from pipeline.tiers.remote import open_remote

    settings = Settings.from_env(env)
    DiskTier(settings.cache_dir)  # its checks: a directory this user can write
    CredentialSources.load(env, authfile=settings.authfile)
    if settings.remote_url:
        try:
            open_remote(settings.remote_url).connect()
        except (RemoteTierUnavailable, Unauthorized) as e:
            raise UsageError(f"{e}; the worker does not start without its remote tier "
                             "(check LAYERWARM_REMOTE, AWS_ENDPOINT_URL_S3 and the "
                             "credentials)") from None
    return settings


def _worker_env(args: argparse.Namespace, node: str) -> dict[str, str]:
    """The environment of the host's Celery workers: this process's, plus its flags."""
    env = dict(os.environ, LAYERWARM_NODE=node)
    for name, value in (("LAYERWARM_CACHE_DIR", args.cache_dir),
                        ("LAYERWARM_REMOTE", args.remote)):
        if value:
            env[name] = value
    _registry_env(args, env)
    return env


def _celery_commands(args: argparse.Namespace, node: str,
                     settings: Settings) -> dict[str, list[str]]:
    """The command lines of the host's IO worker and CPU worker, by Celery node name."""
    from workers.routing import FLEET_QUEUE, node_cpu_queue, node_io_queue

    io = args.io_concurrency or settings.io_threads
    cpu = args.cpu_concurrency or settings.cpu_threads
    celery = [sys.executable, "-m", "celery", "-A", "workers.app", "worker", "-P", "threads",
              "--without-mingle", "--without-gossip", "-E", "-l", args.loglevel]
    return {
        f"io@{node}": [*celery, "-n", f"io@{node}", "-c", str(io),
                       "-Q", f"{FLEET_QUEUE},{node_io_queue(node)}"],
        # Only this host consumes its CPU queue, so holding a few messages ahead takes
        # work from no one, and the next decompress starts without a broker round trip.
        f"cpu@{node}": [*celery, "-n", f"cpu@{node}", "-c", str(cpu),
                        "--prefetch-multiplier", str(CPU_PREFETCH), "-Q", node_cpu_queue(node)],
    }


def _supervise(commands: dict[str, list[str]], env: dict[str, str]) -> int:
    """Run `commands`, restart one that fails (within limits), stop all on a signal."""
    import signal
    import subprocess

    procs = {name: subprocess.Popen(cmd, env=env) for name, cmd in commands.items()}
    restarts: dict[str, list[float]] = {name: [] for name in commands}
    stopping = False
    signalled: set[int] = set()

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        # Once per child: Celery takes a second SIGTERM as "cold shutdown, now".
        for p in procs.values():
            if p.poll() is None and p.pid not in signalled:
                signalled.add(p.pid)
                p.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while not stopping:
        time.sleep(0.2)
        for name, p in procs.items():
            code = p.poll()
            if code is None or stopping:
                continue
            now = time.monotonic()
            recent = [t for t in restarts[name] if now - t < RESTART_WINDOW]
            if code > 0 and len(recent) < MAX_RESTARTS:
                print(f"layerwarm: {name} exited with code {code}; starting it again",
                      file=sys.stderr, flush=True)
                restarts[name] = [*recent, now]
                procs[name] = subprocess.Popen(commands[name], env=env)
            else:
                print(f"layerwarm: {name} stopped (code {code}); stopping the host",
                      file=sys.stderr, flush=True)
                stop(signal.SIGTERM, None)
                break
    codes = [p.wait() for p in procs.values()]
    return EXIT_OK if all(c == 0 for c in codes) else EXIT_FAILED


def _claim_node(node: str) -> str:
    """Refuse to run a second host under a live node's name (workers/nodeclaim.py); the
    claim is renewed while this process runs and dropped when it exits. Returns the
    claim's run id, which the host's workers write into the layer records they touch."""
    import atexit

    from workers.app import NODE_TTL, broker_url
    from workers.nodeclaim import NodeClaim
    from workers.redisconn import connect

    claim = NodeClaim(connect(broker_url()), node, NODE_TTL)
    claim.claim()
    atexit.register(claim.drop)
    claim.keep()
    return claim.run


def serve_metrics(env: dict[str, str], address: str, port: int) -> None:
    """`layerwarm metrics` for this host's cache over HTTP, for as long as the host runs.

    Served by this supervising process (a daemon thread), not by a Celery worker: it
    reads `.meta.db` and the directory at each scrape, so it sees what both pools count.
    """
    from pipeline.config import Settings
    from pipeline.metrics import serve
    from pipeline.tiers.disk import DiskTier

    cache_dir = Settings.from_env(env).cache_dir
    try:
        serve(DiskTier(cache_dir), port, address)
    except OSError as e:
        raise LayerwarmError(
            f"cannot serve metrics on {address}:{port}: {e.strerror or e}"
        ) from None
    print(f"layerwarm: metrics of {cache_dir} on http://{address}:{port}/metrics",
          file=sys.stderr, flush=True)


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = 0
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"not a TCP port: {text!r}")
    return port


def register(sub: Subparsers) -> None:
    w = _command(sub, "worker", cmd_worker,
                 "run one worker host: IO and CPU Celery workers")
    w.add_argument("--node", required=True, help="this host's name in the fleet")
    w.add_argument("--io-concurrency", type=int, metavar="N", help="fetch/publish threads (16)")
    w.add_argument("--cpu-concurrency", type=int, metavar="N",
                   help="decompress threads (one per core)")
    w.add_argument("--cache-dir", metavar="DIR", help="disk tier (env LAYERWARM_CACHE_DIR)")
    w.add_argument("--remote", metavar="URL", help="shared tier (env LAYERWARM_REMOTE)")
    w.add_argument("--authfile", metavar="PATH",
                   help=AUTHFILE_HELP)
    w.add_argument("--insecure-registry", action="append", default=[], metavar="HOST[:PORT]",
                   help="allow plain HTTP to this registry (env LAYERWARM_INSECURE_REGISTRIES)")
    w.add_argument("--loglevel", default="info", help="Celery log level (info)")
    w.add_argument("--metrics-port", type=_port, metavar="PORT",
                   help="serve this host's cache metrics (Prometheus text) on /metrics")
    w.add_argument("--metrics-address", default="127.0.0.1", metavar="ADDR",
                   help="address for --metrics-port (127.0.0.1; 0.0.0.0 for every interface)")

    n = _command(sub, "nodes", cmd_nodes, "list live worker hosts")
    n.add_argument("--json", action="store_true")
