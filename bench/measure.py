"""Run real commands and measure them: wall time, exit status, peak RSS, CPU; drop page
caches.

``run`` starts a child with ``subprocess.Popen`` and reaps it with ``os.wait4``. Its
``maxrss`` is the child's own high-water mark (``VmHWM``), polled from /proc while it
runs: Linux carries the *parent's* peak into a child's ``ru_maxrss`` across fork and
exec, so wait4's figure would report the harness's size, not the command's. Its ``cpu``
says where the machine's cores went while it ran (``CpuUse``): a ratio that will not move
is often a machine with no core left, and this shows it.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path


class CommandFailed(RuntimeError):
    """A measured command exited non-zero; the message holds its output."""


_HZ = os.sysconf("SC_CLK_TCK")  # the unit of /proc's CPU times


@dataclass
class CpuUse:
    """Core-seconds spent while a command ran: by the command (user + sys of it and the
    children it waited for), by the whole machine (/proc/stat: all but idle and iowait),
    and by each watched process (a server it talks to: registry, moto_server), with the
    kernel's part of that (sys) apart: on a VM a server's page faults can cost more than
    its own code, and vary run to run."""

    own: float = 0.0
    machine: float = 0.0
    watched: dict[str, float] = field(default_factory=dict)
    watched_kernel: dict[str, float] = field(default_factory=dict)


def machine_busy() -> float:
    """Core-seconds the machine has been busy since boot (/proc/stat's first line)."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:8]]
    return (sum(ticks) - ticks[3] - ticks[4]) / _HZ


def process_times(pid: int) -> tuple[float, float]:
    """Core-seconds (user, sys) a running process has used; zeros once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0, 0.0
    return int(fields[11]) / _HZ, int(fields[12]) / _HZ


def group_times(before: Mapping[int, tuple[float, float]]) -> tuple[float, float]:
    """Core-seconds (user, sys) a group of processes has used since `before` (pid ->
    `process_times` then), summed; a process gone since counts nothing, not less."""
    user = kernel = 0.0
    for pid, (u0, k0) in before.items():
        u1, k1 = process_times(pid)
        if (u1, k1) != (0.0, 0.0):
            user, kernel = user + u1 - u0, kernel + k1 - k0
    return user, kernel


@dataclass
class RunResult:
    argv: list[str]
    seconds: float
    returncode: int
    stdout: str
    stderr: str
    maxrss_kib: int
    cpu: CpuUse = field(default_factory=CpuUse)

    def check(self) -> RunResult:
        if self.returncode != 0:
            raise CommandFailed(
                f"`{' '.join(self.argv)[:300]}` exited {self.returncode}\n"
                f"stdout: {self.stdout[-2000:]}\nstderr: {self.stderr[-3000:]}"
            )
        return self


class _HighWater:
    """Polls /proc/PID/status for VmHWM (kB) until stopped; keeps the largest value seen."""

    def __init__(self, pid: int, every: float = 0.02) -> None:
        self.kib, self._pid, self._every = 0, pid, every
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._done.is_set():
            try:
                with open(f"/proc/{self._pid}/status") as f:
                    for line in f:
                        if line.startswith("VmHWM:"):
                            self.kib = max(self.kib, int(line.split()[1]))
            except (OSError, ValueError):
                pass  # exiting, or already a zombie: keep what we saw
            self._done.wait(self._every)

    def stop(self) -> None:
        self._done.set()
        self._thread.join()


def run(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
    timeout: float = 3600,
    stdout_path: Path | None = None,
    check: bool = True,
    watch: Mapping[str, int | Sequence[int]] | None = None,
) -> RunResult:
    """Run ``argv`` to completion; ``stdout_path`` sends stdout to that file instead;
    ``watch``: name -> pid (or pids, counted together) of processes whose CPU during the
    run goes into ``cpu``."""
    watch = {name: [pids] if isinstance(pids, int) else list(pids)
             for name, pids in (watch or {}).items()}
    with tempfile.TemporaryFile() as err, tempfile.TemporaryFile() as out_tmp:
        out = open(stdout_path, "wb") if stdout_path is not None else out_tmp
        try:
            before = {name: {pid: process_times(pid) for pid in pids}
                      for name, pids in watch.items()}
            busy = machine_busy()
            started = time.perf_counter()
            proc = subprocess.Popen(
                list(argv), env=dict(env) if env is not None else None, cwd=cwd,
                stdin=subprocess.DEVNULL, stdout=out, stderr=err,
            )  # fmt: skip
            timer = threading.Timer(timeout, proc.kill)
            timer.start()
            hwm = _HighWater(proc.pid)
            try:
                _pid, status, usage = os.wait4(proc.pid, 0)
            finally:
                timer.cancel()
                hwm.stop()
            seconds = time.perf_counter() - started
            spent = {name: group_times(times) for name, times in before.items()}
            cpu = CpuUse(usage.ru_utime + usage.ru_stime, machine_busy() - busy,
                         {name: user + sys for name, (user, sys) in spent.items()},
                         {name: sys for name, (_user, sys) in spent.items()})
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
            hwm.kib, cpu,
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
