"""The bench's command runner counts CPU: the command's own, the machine's, a watched
process's. Judged on CPU the child burns by its own clock, never on wall time."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from bench.measure import group_times, process_times, run

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
    assert 0.0 <= r.cpu.watched_kernel["sleeper"] <= r.cpu.watched["sleeper"]


# Waits for the file `go`, then reads /dev/zero (kernel time: the copies) until its own
# system clock has 0.3 s more, writes the file `done` and sleeps.
KERNEL_BURN = """
import os, sys, time
go, done = sys.argv[1:]
while not os.path.exists(go): time.sleep(0.01)
fd, start = os.open("/dev/zero", os.O_RDONLY), os.times().system
while os.times().system - start < 0.3: os.read(fd, 1 << 20)
open(done, "w").close()
time.sleep(60)
"""


def test_a_watched_servers_kernel_time_is_counted_apart(tmp_path: Path) -> None:
    go, done = tmp_path / "go", tmp_path / "done"
    server = subprocess.Popen([sys.executable, "-c", KERNEL_BURN, str(go), str(done)])
    # The command starts the burn and waits for its end: the burn falls inside the run.
    command = (f"import pathlib, time; pathlib.Path({str(go)!r}).touch()\n"
               f"while not pathlib.Path({str(done)!r}).exists(): time.sleep(0.01)")
    try:
        r = run([sys.executable, "-c", command], watch={"server": server.pid})
    finally:
        server.kill()
        server.wait()
    assert r.cpu.watched_kernel["server"] >= 0.3 - 0.02  # less a clock tick or two
    assert r.cpu.watched["server"] >= r.cpu.watched_kernel["server"]


# Waits for the file `go`, spins until its own CPU clock has 0.3 s more, writes `done`
# and sleeps.
USER_BURN = """
import os, sys, time
go, done = sys.argv[1:]
while not os.path.exists(go): time.sleep(0.01)
start = time.process_time()
while time.process_time() - start < 0.3: pass
open(done, "w").close()
time.sleep(60)
"""


def test_a_watched_group_counts_its_processes_together(tmp_path: Path) -> None:
    """A worker fleet is watched as one name: the CPU of every process in it, summed."""
    go = tmp_path / "go"
    dones = [tmp_path / f"done{i}" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "-c", USER_BURN, str(go), str(d)]) for d in dones]
    command = (f"import pathlib, time; pathlib.Path({str(go)!r}).touch()\n"
               f"while not all(pathlib.Path(d).exists() for d in {[str(d) for d in dones]!r}):"
               " time.sleep(0.01)")
    try:
        r = run([sys.executable, "-c", command],
                watch={"group": [p.pid for p in procs], "one": procs[0].pid})
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert r.cpu.watched["one"] >= 0.3 - 0.02  # less a clock tick or two
    assert r.cpu.watched["group"] >= 2 * (0.3 - 0.02)
    assert 0.0 <= r.cpu.watched_kernel["group"] <= r.cpu.watched["group"]


def test_a_process_gone_from_a_group_counts_nothing_not_less() -> None:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    assert group_times({p.pid: (1.0, 0.5)}) == (0.0, 0.0)
    assert group_times({os.getpid(): (0.0, 0.0)})[0] > 0.0


def test_process_times_of_a_process_that_is_gone_are_zero() -> None:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    assert process_times(p.pid) == (0.0, 0.0)
    assert sum(process_times(os.getpid())) > 0.0


def test_the_shared_bound_with_requests_start_up_replaces_the_bare_interpreters() -> None:
    from bench.floor import Floor

    floor = Floor({"decompress": 0.6, "sha256": 0.4, "blob sha256": 0.1, "write": 0.3,
                   "transfer": 0.2}, start=0.05, cores=2, client_start=0.25)
    assert round(floor.shared, 3) == 0.75  # (0.6 + 0.4 + 0.1 + 0.3) / 2 + 0.05
    assert round(floor.client_shared, 3) == 0.95  # the same, + 0.25 instead of 0.05
    assert "starts in 0.25 s, which makes the shared bound 0.95 s" in floor.note()
    assert Floor({"decompress": 1.0}, start=0.05).client_shared == 0.0  # not measured
