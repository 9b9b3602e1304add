"""Stage progress from inside a task: into the job record's progress field and the task's
Celery state.

Writes are throttled (a task's first stage writes at once unless started quiet; later
stages and bytes at most every half second) so a fast layer does not turn into many Redis
writes. Celery state
`PROGRESS` with bytes done/total, written from the second write on (a task running for
more than half a second), is what Flower shows for a running task.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

from celery import Task

from pipeline.layer import LayerSpec
from workers.jobs import JobStore

# A remote restore is a fetch from the shared tier as far as a job's states go.
_JOB_STATE = {"restoring": "fetching"}


class JobProgress:
    INTERVAL = 0.5

    def __init__(self, task: Task, jobs: JobStore, job_id: str, target: str, node: str,
                 run: str, *, lease: str | None = None, quiet_start: bool = False) -> None:
        """`run`: this start of the host, recorded with the node so the sweeper can tell
        when the worker that carried the layer is gone. `quiet_start`: even the first stage
        waits for the interval (a tiny layer is usually done before then, and its record
        goes from pending to done)."""
        self.task, self.jobs, self.job_id, self.target = task, jobs, job_id, target
        self.node, self.run = node, run
        # The layer's lease token, once the fetch holds it: recorded so that a fetch the
        # sweeper sends again carries it on, instead of waiting for it to lapse.
        self.lease = lease
        self._lock = threading.Lock()
        self._stage, self._done, self._total = "pending", 0, 0
        self._last = time.monotonic() if quiet_start else 0.0

    def planned(self, layers: Sequence[LayerSpec]) -> None:
        pass

    def stage(self, layer: LayerSpec, stage: str, total: int | None) -> None:
        if stage in ("done", "failed"):
            return  # the task records the outcome itself, with its tier
        with self._lock:
            self._stage, self._done, self._total = _JOB_STATE.get(stage, stage), 0, total or 0
            # The first stage of a task always shows; later ones wait for the interval (the
            # next `advance` writes them), so a tiny layer's stages cost no Redis writes.
            due = not self._last or time.monotonic() - self._last >= self.INTERVAL
        if due:
            self._write(layer)

    def advance(self, layer: LayerSpec, nbytes: int) -> None:
        with self._lock:
            self._done += nbytes
            due = time.monotonic() - self._last >= self.INTERVAL
        if due:
            self._write(layer)

    def _write(self, layer: LayerSpec) -> None:
        with self._lock:
            # A task's first write goes to the job record only: Celery's PROGRESS state (a
            # GET and a SET) is for tasks that last long enough to be watched in Flower.
            celery_state, self._last = bool(self._last), time.monotonic()
            stage, done, total = self._stage, self._done, self._total
        self.jobs.progress_layer(
            self.job_id, str(layer.digest), self.target,
            state=stage, bytes_done=done, bytes_total=total, host=self.node, run=self.run,
            **({"lease": self.lease} if self.lease else {}),
        )
        if celery_state and self.task.request.id:
            self.task.update_state(state="PROGRESS", meta={
                "digest": str(layer.digest), "stage": stage, "done": done, "total": total,
                "host": self.node,
            })
