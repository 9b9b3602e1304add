"""The bench's command runner counts CPU: the command's own, the machine's, a watched
process's. Judged on CPU the child burns by its own clock, never on wall time."""

from __future__ import annotations

import os
import subprocess
import sys

from bench.measure import process_cpu, run

# Spins until its own CPU clock reaches 0.3 s, however busy the machine is.
BURN = "import time\nwhile time.process_time() < 0.3: pass"


def test_run_counts_the_commands_cpu_and_the_machines() -> None:
    idle = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        r = run([sys.executable, "-c", BURN], watch={"sleeper": idle.pid})
    finally:
        idle.kill()
        idle.wait()
    assert r.returncode == 0
    assert r.cpu.own >= 0.3
    # The machine was busy at least while the command was (less a clock tick or two).
    assert r.cpu.machine >= r.cpu.own - 0.05
    assert r.cpu.watched == {"sleeper": r.cpu.watched["sleeper"]}
    assert r.cpu.watched["sleeper"] < 0.1  # asleep throughout


def test_process_cpu_of_a_process_that_is_gone_is_zero() -> None:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    assert process_cpu(p.pid) == 0.0
    assert process_cpu(os.getpid()) > 0.0


def test_the_shared_bound_with_requests_start_up_replaces_the_bare_interpreters() -> None:
    from bench.floor import Floor

    floor = Floor({"decompress": 0.6, "sha256": 0.4, "blob sha256": 0.1, "write": 0.3,
                   "transfer": 0.2}, start=0.05, cores=2, client_start=0.25)
    assert round(floor.shared, 3) == 0.75  # (0.6 + 0.4 + 0.1 + 0.3) / 2 + 0.05
    assert round(floor.client_shared, 3) == 0.95  # the same, + 0.25 instead of 0.05
    assert "starts in 0.25 s, which makes the shared bound 0.95 s" in floor.note()
    assert Floor({"decompress": 1.0}, start=0.05).client_shared == 0.0  # not measured
