"""A test's view of a process tree, read from /proc: a process's descendants and command
lines, and pids that are signalled only while they are still the process that was found
(tests/support/fleet.py's node faults, test_no_hangs.py, test_secrets.py, test_lost_chains.py).
"""

from __future__ import annotations

import os
from pathlib import Path


def _stat(pid: int) -> tuple[int, int] | None:
    """(ppid, start time in clock ticks) of ``pid``, or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()  # after "pid (comm) "
    return int(fields[1]), int(fields[19])


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def descendants(root: int) -> list[int]:
    """Every live descendant of ``root``, parents before children (breadth first)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            st = _stat(int(entry.name))
            if st is not None:
                children.setdefault(st[0], []).append(int(entry.name))
    out: list[int] = []
    queue = list(children.get(root, []))
    while queue:
        pid = queue.pop(0)
        out.append(pid)
        queue += children.get(pid, [])
    return out


class Pid:
    """A pid plus its start time, so a recycled pid is never signalled by mistake."""

    def __init__(self, pid: int) -> None:
        st = _stat(pid)
        self.pid = pid
        self.start = st[1] if st else -1

    def alive(self) -> bool:
        st = _stat(self.pid)
        if st is None or st[1] != self.start:
            return False
        try:  # a zombie has a stat file but no longer runs
            return Path(f"/proc/{self.pid}/status").read_text().find("State:\tZ") < 0
        except OSError:
            return False

    def signal(self, sig: int) -> None:
        if self.alive():
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass
