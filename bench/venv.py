"""The interpreter the bench runs under: a virtual environment of its own, as README installs.

A user runs layerwarm from `python3 -m venv .venv && .venv/bin/pip install .`. The team's
machines run it from the base interpreter, whose site-packages holds `.pth` files that
run code at every interpreter start (an editable install's import finder, a sandbox's CA
hook that imports certifi): `python3 -c pass` took 0.06 s there against 0.013 s in a
venv, and a `warm` with every layer on disk (scenario 6) ~0.012 s more, since certifi is
imported by requests anyway. So `python3 -m bench` re-runs itself in a venv kept in the
bench's cache directory, with layerwarm (and its test extra, which the bench's servers
need) installed from this checkout as a path entry: the checkout's code, no import hook.
Every child the bench starts with `sys.executable` (layerwarm, workers, the floors'
`python3 -c pass`) then starts as a user's would. The peers are not Python; the S3
server (moto_server) is found on PATH as before.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

from bench import REPO_ROOT

COMPLETE = ".layerwarm-bench-complete"  # written last: a venv without it is built again


def venv_dir(cache_root: Path) -> Path:
    """Where the venv for this checkout's dependencies and this interpreter lives."""
    key = hashlib.sha256(
        (REPO_ROOT / "pyproject.toml").read_bytes() + sys.version.encode()
        + str(REPO_ROOT).encode()).hexdigest()[:12]
    return cache_root / f"venv-{key}"


def running_in(venv: Path) -> bool:
    return Path(sys.prefix).resolve() == venv.resolve()


def ensure(venv: Path) -> Path:
    """Build `venv` unless it is complete; its python."""
    python = venv / "bin" / "python"
    if (venv / COMPLETE).exists():
        return python
    print(f"bench: building its venv {venv} (once per pyproject.toml)", file=sys.stderr,
          flush=True)
    base = getattr(sys, "_base_executable", sys.executable)
    steps = [
        [base, "-m", "venv", "--clear", str(venv)],
        # editable_mode=compat: a plain path entry for the checkout, not setuptools' finder
        [str(python), "-m", "pip", "install", "-q", "-e", ".[test]",
         "--config-settings", "editable_mode=compat"],
    ]
    for step in steps:
        if subprocess.run(step, cwd=REPO_ROOT).returncode != 0:
            sys.exit(f"bench: building its venv failed at `{' '.join(step[:4])} ...` "
                     "(its output is above); fix that and run the bench again")
    (venv / COMPLETE).write_text("ok\n")
    return python


def rerun_in(venv: Path, argv: list[str]) -> None:
    """Replace this process with `python -m bench ARGV` under `venv`'s python."""
    python = ensure(venv)
    os.execv(python, [str(python), "-m", "bench", *argv])
