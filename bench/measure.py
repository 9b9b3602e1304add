"""Run real commands and measure them: wall time, exit status, peak RSS; drop page caches.

``run`` starts a child with ``subprocess.Popen`` and reaps it with ``os.wait4``, which
returns that one child's resource usage, so ``maxrss`` is the peak RSS of exactly the
process measured (not of every child the harness ever waited for).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path


class CommandFailed(RuntimeError):
    """A measured command exited non-zero; the message holds its output."""


@dataclass
class RunResult:
    argv: list[str]
    seconds: float
    returncode: int
    stdout: str
    stderr: str
    maxrss_kib: int

    def check(self) -> RunResult:
        if self.returncode != 0:
            raise CommandFailed(
                f"`{' '.join(self.argv)[:300]}` exited {self.returncode}\n"
                f"stdout: {self.stdout[-2000:]}\nstderr: {self.stderr[-3000:]}"
            )
        return self


def run(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
    timeout: float = 3600,
    stdout_path: Path | None = None,
    check: bool = True,
) -> RunResult:
    """Run ``argv`` to completion; ``stdout_path`` sends stdout to that file instead."""
    with tempfile.TemporaryFile() as err, tempfile.TemporaryFile() as out_tmp:
        out = open(stdout_path, "wb") if stdout_path is not None else out_tmp
        try:
            started = time.perf_counter()
            proc = subprocess.Popen(
                list(argv), env=dict(env) if env is not None else None, cwd=cwd,
                stdin=subprocess.DEVNULL, stdout=out, stderr=err,
            )  # fmt: skip
            timer = threading.Timer(timeout, proc.kill)
            timer.start()
            try:
                _pid, status, usage = os.wait4(proc.pid, 0)
            finally:
                timer.cancel()
            seconds = time.perf_counter() - started
            proc.returncode = os.waitstatus_to_exitcode(status)
        finally:
            if stdout_path is not None:
                out.close()
        err.seek(0)
        stdout = ""
        if stdout_path is None:
            out_tmp.seek(0)
            stdout = out_tmp.read().decode(errors="replace")
        result = RunResult(
            list(argv), seconds, proc.returncode, stdout, err.read().decode(errors="replace"),
            int(usage.ru_maxrss),
        )
    return result.check() if check else result


_DROP: bool | None = None


def drop_caches() -> bool:
    """``sync; echo 3 > /proc/sys/vm/drop_caches``; False (once decided) if refused."""
    global _DROP
    if _DROP is False:
        return False
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        _DROP = True
    except OSError:
        _DROP = False
    return _DROP


def can_drop_caches() -> bool:
    return drop_caches() if _DROP is None else _DROP


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def timed(fn, *args, **kwargs) -> tuple[float, object]:  # noqa: ANN001
    """Wall time of a Python call (for measurements that are several commands)."""
    started = time.perf_counter()
    value = fn(*args, **kwargs)
    return time.perf_counter() - started, value
