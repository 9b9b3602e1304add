"""`--version` through the real CLI: `layerwarm <version>` from the installed metadata."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from tests.support.cli import layerwarm_env


@pytest.mark.parametrize("module", ["workers.cli", "pipeline.cli"])
def test_version_prints_the_installed_version(module: str, tmp_path: Path) -> None:
    # Both ways to run the command: the `layerwarm` entry point (workers.cli) and the
    # embedded-only `python3 -m pipeline.cli`. No broker, no cache dir is touched.
    done = subprocess.run(
        [sys.executable, "-m", module, "--version"],
        env=layerwarm_env(tmp_path / "cache"),
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"layerwarm {version('layerwarm')}\n"
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "cache").exists()
