"""A Celery worker process's start: what it does before its first task.

`layerwarm worker` starts each Celery worker with the supervisor's pid; the worker stops
with its supervisor, and loads what the stages load on first use before it takes a
task. Celery imports this module with the tasks (workers/app.py `include`).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import threading
from typing import Any

from celery.signals import worker_init, worker_ready

from pipeline import codecs, writebehind
from pipeline.errors import LayerwarmError, describe_error
from pipeline.tiers.remote import RemoteTier
from workers.app import REQUEUE_AFTER
from workers.layertask import bookkeeping, context
from workers.sweeper import start_sweeper
from workers.tasks import WAIT_SLOTS

log = logging.getLogger("layerwarm")

PR_SET_PDEATHSIG = 1  # prctl(2): the signal this process gets when its parent dies


@worker_init.connect
def _stop_with_supervisor(**_: Any) -> None:
    """A Celery worker of `layerwarm worker` gets SIGTERM (a warm shutdown: it finishes
    its running tasks) when its supervisor dies, even by SIGKILL. Otherwise it would go on
    taking the node's messages while the node's claim lapses and another host takes the
    name, and the layers it then carries would be written under a run nobody owns."""
    supervisor = os.environ.get("LAYERWARM_SUPERVISOR_PID")
    if not supervisor or os.uname().sysname != "Linux":
        return
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != int(supervisor):  # it died before the line above ran
        os.kill(os.getpid(), signal.SIGTERM)


@worker_ready.connect
def _ready(sender: Any = None, **_: Any) -> None:
    """Before the first task: build the context and load what the stages load on first
    use (codecs, writeback, the remote tier's client), so a job does not wait on it (in
    a fleet of two hosts that was four processes importing boto3 in a job's first second).
    Both start the lease renewer: a node's leases stay held while any of its workers
    lives, across the hand-offs between stages. IO workers also start the sweeper."""
    bookkeeping().leases.start_renewer()
    try:
        c = context()
    except (LayerwarmError, OSError) as e:  # every task will fail its layer with this
        log.error("this worker cannot work: %s", describe_error(e))
        return
    codecs.preload()
    writebehind.preload()
    if str(getattr(sender, "hostname", "")).startswith("io@"):
        start_sweeper(c.jobs, after=REQUEUE_AFTER)
        threads = getattr(getattr(sender, "controller", None), "concurrency", None)
        if isinstance(threads, int):
            WAIT_SLOTS.size(threads)
        if c.env.remote is not None:
            # On a thread: an unreachable endpoint takes its timeouts, and the worker must
            # take tasks meanwhile (a task needing the client waits for it, or makes it).
            threading.Thread(target=_connect, args=(c.env.remote,), daemon=True,
                             name="layerwarm-connect").start()


def _connect(remote: RemoteTier) -> None:
    try:
        remote.connect()
    except LayerwarmError as e:  # the tasks meet it again, and handle it there
        log.warning("remote tier %s: %s", remote.url, describe_error(e))
