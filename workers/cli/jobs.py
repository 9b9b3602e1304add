"""submit, status, jobs and cancel: a fleet's jobs; `--wait`/`--watch` follow one to its end."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import TYPE_CHECKING, Any

from pipeline import cli as base
from pipeline.cli.common import EXIT_FAILED, EXIT_OK
from pipeline.errors import LayerwarmError, UsageError
from pipeline.progress import MAX_ROWS, LiveArea, bar_line, human_bytes, human_seconds, total_line
from pipeline.report import layer_error_line, source_label
from pipeline.table import counted, table
from workers.cli import Subparsers, _broker_env, _command, live_nodes

if TYPE_CHECKING:
    from workers.jobs import JobStore

# `--wait`/`--watch` stopped at `--timeout`; the job goes on. 124 as timeout(1) exits, so
# a script tells "still running" from "failed" (1) and from a usage error (2).
EXIT_TIMEOUT = 124


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
    lines += [layer_error_line(x["digest"], x["reason"] or "no reason recorded", x["target"])
              for x in status["layers"] if x["state"] == "failed"]
    return "\n".join(lines)


def register(sub: Subparsers) -> None:
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
