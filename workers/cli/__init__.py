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

Celery and Redis are imported only by these commands, so `warm` and `plan` start fast and
need no broker. So are the modules only one command uses (signal, subprocess, tempfile,
uuid): `warm` is a short process whose start-up is part of its run time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from pipeline import cli as base
from pipeline.cli.common import AUTHFILE_HELP
from pipeline.errors import LayerwarmError, UsageError
from pipeline.progress import MAX_ROWS, LiveArea, bar_line, human_bytes, human_seconds, total_line
from pipeline.report import source_label
from pipeline.table import counted, table
from workers.credentials import (
    BROKER_ENV,
    FLOWER_AUTH_ENV,
    FLOWER_OWN_ENV,
    flower_logins,
    resolve_broker_url,
)

if TYPE_CHECKING:
    from pipeline.config import Settings
    from workers.jobs import JobStore

EXIT_OK, EXIT_FAILED = base.EXIT_OK, base.EXIT_FAILED
# `--wait`/`--watch` stopped at `--timeout`; the job goes on. 124 as timeout(1) exits, so
# a script tells "still running" from "failed" (1) and from a usage error (2).
EXIT_TIMEOUT = 124


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
    """Worker hosts whose IO worker answers a ping."""
    from workers.app import app

    replies = app.control.ping(timeout=timeout) or []
    names = {name for reply in replies for name in reply}
    return sorted(n.split("@", 1)[1] for n in names if n.startswith("io@"))


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

    `--authfile` becomes REGISTRY_AUTH_FILE (where pipeline/registry/auth.py looks next), read
    once here so a wrong path is said before the host starts, not once per layer;
    `--insecure-registry` adds to LAYERWARM_INSECURE_REGISTRIES, as it does for `warm`.
    """
    from pathlib import Path

    from pipeline.registry.auth import DockerConfig

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
    from pipeline.registry.auth import CredentialSources
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


def _store() -> JobStore:  # imported lazily with redis (workers.redisconn)
    from workers.app import JOB_TTL, broker_url
    from workers.jobs import JobStore
    from workers.redisconn import connect

    return JobStore(connect(broker_url()), JOB_TTL)


def cmd_submit(args: argparse.Namespace) -> int:
    import uuid

    _broker_env(args)
    from workers.app import enqueue_job
    from workers.routing import Target

    refs = [str(r) for r in base.read_refs(args)]
    if args.to == "all-nodes":
        targets = [f"node:{n}" for n in live_nodes()]
        if not targets:
            raise LayerwarmError("no live worker hosts to send the job to (layerwarm nodes)")
    else:
        target = Target.parse(args.to)
        targets = [str(target)]
        if target.node is not None and target.node not in live_nodes():
            print(f"layerwarm: warning: node {target.node} is not live now; its layers wait "
                  "in its queue", file=sys.stderr)
        elif target.node is None and not live_nodes():
            print("layerwarm: warning: no worker host is live now; the job waits in the fleet "
                  "queue (layerwarm nodes)", file=sys.stderr)
    base.platform_arg(args)  # a bad --platform is a usage error here, not on a worker
    limit = wait_limit(args.timeout, args.wait, "--wait")  # checked before the job exists
    platform = "all" if args.all_platforms else (args.platform or None)
    job_id = uuid.uuid4().hex
    _store().create(job_id, refs, args.to, platform)
    enqueue_job(job_id, refs, targets, platform)
    if not args.wait:
        print(job_id)
        return EXIT_OK
    print(f"job {job_id} submitted", file=sys.stderr)
    return follow(job_id, args.json, limit)


def cmd_status(args: argparse.Namespace) -> int:
    _broker_env(args)
    limit = wait_limit(args.timeout, args.watch, "--watch")
    if args.watch:
        return follow(args.job_id, args.json, limit)
    status = _store().status(args.job_id)
    if status is None:
        raise LayerwarmError(f"no job {args.job_id} (unknown, or expired)")
    print(json.dumps(status, indent=2) if args.json else status_text(status))
    return EXIT_OK


def cmd_jobs(args: argparse.Namespace) -> int:
    """Recent jobs, newest first: a table, or with --json the `status` of each."""
    _broker_env(args)
    if args.limit < 1:
        raise UsageError("--limit must be at least 1")
    jobs = _store().recent(args.limit)
    if args.json:
        print(json.dumps(jobs, indent=2))
    elif jobs:
        print("\n".join(table(("JOB", "STATE", "TARGET", "LAYERS", "AGE", "IMAGES"),
                              [_job_row(j) for j in jobs])))
    else:
        print("layerwarm: no jobs on record", file=sys.stderr)
    return EXIT_OK


def cmd_cancel(args: argparse.Namespace) -> int:
    """Stop a job's layers that have not started (workers.jobs.JobStore.cancel)."""
    _broker_env(args)
    from workers.jobs import FINISHED

    store = _store()
    status = store.status(args.job_id)
    if status is None:
        raise LayerwarmError(f"no job {args.job_id} (unknown, or expired)")
    if status["state"] in FINISHED:
        print(f"job {args.job_id} already {status['state']}: nothing to cancel")
        return EXIT_OK
    stopped = store.cancel(args.job_id) or 0
    print(f"job {args.job_id} cancelled: {stopped} layer{'' if stopped == 1 else 's'} "
          "not started")
    return EXIT_OK


def _job_row(status: dict[str, Any]) -> tuple[str, ...]:
    t = status["totals"]
    refs = status["refs"]
    images = refs[0] + (f" (+{len(refs) - 1})" if len(refs) > 1 else "") if refs else "-"
    return (status["id"], status["state"], status["target"], f"{t['done']}/{t['layers']}",
            human_seconds(time.time() - status["created"]), images)


FOLLOW_REDRAW = 0.5  # seconds between reads of a job when no layer finishes meanwhile


def wait_limit(text: str | None, following: bool, flag: str) -> tuple[float, str] | None:
    """`--timeout`'s seconds and how the user wrote them, or None: wait for the end."""
    from pipeline.units import parse_duration

    if text is None:
        return None
    if not following:
        raise UsageError(f"--timeout needs {flag}")
    seconds = parse_duration(text, "--timeout")
    if seconds <= 0:
        raise UsageError(f"--timeout must be more than 0, not {text!r}")
    return seconds, text + "s" if text.replace(".", "", 1).isdigit() else text


def follow(job_id: str, as_json: bool, limit: tuple[float, str] | None = None) -> int:
    """Follow a job until it ends, drawing progress; exit like `warm`.

    With a `limit` (--timeout), stop following when it passes: one line names the job
    and how to look at it later, and the exit code is EXIT_TIMEOUT.

    The job is read again every half second, and as soon as its last open layer finishes
    (the job store publishes each layer that does), so the command ends when the job
    does, not up to a poll later, and a job's layers finishing one by one do not each
    cost a read. Reads are spaced by at least ten times what one took: a job of
    thousands of layers is not read back-to-back.
    """
    store = _store()
    events = store.client.pubsub(ignore_subscribe_messages=True)
    events.subscribe(store.events_channel(job_id))  # before the first read: nothing missed
    try:
        return _follow(store, events, job_id, as_json, limit)
    finally:
        events.close()


def _follow(store: JobStore, events: Any, job_id: str, as_json: bool,
            limit: tuple[float, str] | None) -> int:
    from workers.jobs import FINISHED

    area = LiveArea(sys.stderr) if sys.stderr.isatty() else None
    seen: dict[str, str] = {}
    deadline = None if limit is None else time.monotonic() + limit[0]
    while True:
        started = time.monotonic()
        status = store.status(job_id)
        if status is None:
            raise LayerwarmError(f"no job {job_id} (unknown, or expired)")
        if area is not None:
            area.draw(_live_lines(status))
        else:
            for x in status["layers"]:
                key = f"{x['digest']}|{x['target']}"
                if seen.get(key) != x["state"]:
                    seen[key] = x["state"]
                    where = f" on {x['host']}" if x["host"] else ""
                    print(f"layer {x['digest']} {x['target']}: {x['state']}{where}",
                          file=sys.stderr, flush=True)
        if status["state"] in FINISHED:
            break
        if deadline is not None and time.monotonic() >= deadline:
            return _stopped_waiting(area, job_id, limit[1] if limit else "")
        took = time.monotonic() - started
        pause = FOLLOW_REDRAW - took if took < FOLLOW_REDRAW else 0
        if deadline is not None:
            pause = max(0.0, min(pause, deadline - time.monotonic()))
        open_layers = {f"{x['digest']}|{x['target']}" for x in status["layers"]
                       if x["state"] not in FINISHED}
        _until_the_end_may_have_come(events, open_layers, status["state"] != "planning",
                                     pause)
        time.sleep(max(0.0, 10 * took - (time.monotonic() - started)))
    if area is not None:
        area.clear()
    print(json.dumps(status, indent=2) if as_json else status_text(status))
    return EXIT_OK if status["state"] == "done" else EXIT_FAILED


def _until_the_end_may_have_come(events: Any, open_layers: set[str], planned: bool,
                                 pause: float) -> None:
    """Wait `pause` seconds, or less: until the job is planned, or the last of its open
    layers says it finished (the job store publishes "planned" and each finished layer)."""
    end = time.monotonic() + pause
    while (left := end - time.monotonic()) > 0:
        message = events.get_message(timeout=left)
        if message is None:
            continue
        said = message["data"].decode()
        if said == "planned" or not planned:
            return
        open_layers.discard(said)
        if not open_layers:
            return


def _stopped_waiting(area: LiveArea | None, job_id: str, after: str) -> int:
    if area is not None:
        area.clear()
    print(f"layerwarm: job {job_id} is still running after {after}; see it later with "
          f"`layerwarm status {job_id}`", file=sys.stderr)
    return EXIT_TIMEOUT


def _live_lines(status: dict[str, Any]) -> list[str]:
    from workers.jobs import FINISHED

    active = [x for x in status["layers"] if x["state"] not in ("pending", *FINISHED)]
    rows = [
        bar_line(f"{x['digest'][:19]} {x['target']}", x["state"], x["bytes_done"], x["bytes_total"])
        for x in active[:MAX_ROWS]
    ]
    t = status["totals"]
    finished = t["done"] + t["failed"]
    rows.append(total_line(finished, t["layers"], t["bytes_done"], t["bytes_total"],
                           time.time() - status["created"]))
    return rows


def status_text(status: dict[str, Any]) -> str:
    t = status["totals"]
    eta = human_seconds(t["eta_seconds"]) if t["eta_seconds"] else "-"
    lines = [
        f"job {status['id']}  {status['state']}  to {status['target']}  "
        f"{counted(t['layers'], 'layer')}: {t['done']} done, {t['failed']} failed, "
        f"{t['pending']} pending  "
        f"{human_bytes(t['bytes_done'])} / {human_bytes(t['bytes_total'])}  ETA {eta}"
    ]
    rows = [
        (x["digest"][:19], x["target"], x["state"],
         f"{human_bytes(x['bytes_done'])} / {human_bytes(x['bytes_total'])}",
         source_label(x["tier"]) or "-", x["host"] or "-", x.get("publish") or "-")
        for x in status["layers"]
    ]
    if rows:
        header = ("LAYER", "TARGET", "STATE", "PROGRESS", "FROM", "HOST", "PUBLISH")
        lines += table(header, rows)
    lines += [f"error: {f['ref']}: {f['error']}" for f in status["image_failures"]]
    lines += [f"error: layer {x['digest']} ({x['target']}): {x['reason']}"
              for x in status["layers"] if x["state"] == "failed"]
    return "\n".join(lines)


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


def build_parser() -> argparse.ArgumentParser:
    """The embedded commands (pipeline/cli) and the distributed ones, all on one parser."""
    parser = base.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    _add_worker(sub)
    _add_job_commands(sub)
    _add_services(sub)
    return parser


Subparsers = argparse._SubParsersAction  # what add_subparsers returns


def _command(sub: Subparsers, name: str, func: Callable[[argparse.Namespace], int],
             help: str) -> argparse.ArgumentParser:
    """A distributed command: it runs `func` and takes the broker's URL."""
    p = sub.add_parser(name, help=help)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--broker", metavar="URL",
                   help="Redis URL (env LAYERWARM_BROKER_URL, default "
                   "redis://127.0.0.1:6379/0). A password in it is visible to every "
                   "user of this machine (ps); use the env or --broker-file for that")
    g.add_argument("--broker-file", metavar="PATH",
                   help="read the Redis URL from this file (env LAYERWARM_BROKER_URL_FILE)")
    p.set_defaults(func=func)
    return p


def _add_worker(sub: Subparsers) -> None:
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


def _add_job_commands(sub: Subparsers) -> None:
    n = _command(sub, "nodes", cmd_nodes, "list live worker hosts")
    n.add_argument("--json", action="store_true")

    s = _command(sub, "submit", cmd_submit, "enqueue a prewarm job on the fleet")
    base.image_args(s, local=False)
    s.add_argument("--to", default="remote", metavar="TARGET",
                   help="remote (any worker, shared tier), node:NAME, or all-nodes")
    s.add_argument("--wait", action="store_true", help="follow the job to its end")
    _timeout_arg(s, "--wait", "waiting")

    st = _command(sub, "status", cmd_status, "show a job's layers and progress")
    st.add_argument("job_id", metavar="JOB_ID")
    st.add_argument("--watch", action="store_true", help="follow the job to its end")
    _timeout_arg(st, "--watch", "watching")
    st.add_argument("--json", action="store_true")

    jb = _command(sub, "jobs", cmd_jobs, "list recent jobs and their states")
    jb.add_argument("--limit", type=int, default=20, metavar="N", help="at most N jobs (20)")
    jb.add_argument("--json", action="store_true")

    ca = _command(sub, "cancel", cmd_cancel, "stop a job's layers that have not started")
    ca.add_argument("job_id", metavar="JOB_ID")


def _timeout_arg(p: argparse.ArgumentParser, follow: str, doing: str) -> None:
    p.add_argument("--timeout", metavar="SECONDS",
                   help=f"with {follow}: stop {doing} after this long (30, 5m), exit 124")


def _add_services(sub: Subparsers) -> None:
    f = _command(sub, "flower", cmd_flower, "run Flower, Celery's web monitor, for this app")
    f.add_argument("--address", default="127.0.0.1",
                   help="address to serve on (127.0.0.1: this machine only)")
    f.add_argument("--port", type=int, default=5555)
    fa = f.add_mutually_exclusive_group()
    fa.add_argument("--basic-auth", metavar="USER:PASSWORD",
                    help="protect the UI and API. Visible to every user of this machine "
                    "(ps): prefer env LAYERWARM_FLOWER_BASIC_AUTH (or FLOWER_BASIC_AUTH) "
                    "or --basic-auth-file")
    fa.add_argument("--basic-auth-file", metavar="PATH",
                    help="read USER:PASSWORD (one a line) from this file")

    b = _command(sub, "beat", cmd_beat,
                 "run the scheduler that has every node run gc (one per fleet)")
    b.add_argument("--schedule", metavar="FILE",
                   help="where beat keeps its last run times (default: in the temp dir)")
    b.add_argument("--loglevel", default="info", help="Celery log level (info)")


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return base.run(build_parser(), argv)
    except Exception as e:
        # A broker that refuses us (wrong password, down) is a one-line error, not a
        # traceback; the URL is shown with its password masked.
        if type(e).__module__.partition(".")[0] not in ("redis", "kombu"):
            raise
        from kombu.utils.url import maybe_sanitize_url

        from workers.app import broker_url

        print(f"layerwarm: broker {maybe_sanitize_url(broker_url())}: {e}", file=sys.stderr)
        return EXIT_FAILED

