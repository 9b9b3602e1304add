"""A real tmpfs mounted for one test: a full disk (size=...) or a read-only directory (ro)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def tmpfs(where: Path, options: str, purpose: str) -> Iterator[Path]:
    """Mount a tmpfs with `options` on the directory `where` (made if missing) until exit.

    Fails the test, naming `purpose`, when it cannot be mounted (not root, no mount(8)).
    """
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs for {purpose}: {done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)
