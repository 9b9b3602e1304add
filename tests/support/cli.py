"""Run the real `layerwarm` command in a subprocess, as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path


def layerwarm_env(cache_dir: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for one run: its own cache dir, no stray Docker or AWS config."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LAYERWARM_", "AWS_"))}
    env["LAYERWARM_CACHE_DIR"] = str(cache_dir)
    env["DOCKER_CONFIG"] = str(cache_dir.parent / "no-docker-config")
    # Nor a podman/skopeo login of whoever runs the tests (containers' auth.json).
    env.pop("REGISTRY_AUTH_FILE", None)
    env["XDG_RUNTIME_DIR"] = str(cache_dir.parent / "no-xdg-runtime")
    env.update(extra or {})
    return env


def layerwarm_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "workers.cli", *args]


def run_layerwarm(
    *args: str, cache_dir: Path, env: Mapping[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        layerwarm_cmd(*args),
        env=layerwarm_env(cache_dir, env),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def entries(cache_dir: Path) -> set[str]:
    """Names of committed cache entries (what `ls` shows a user)."""
    if not cache_dir.exists():
        return set()
    return {p.name for p in cache_dir.iterdir() if p.name.startswith("sha256_")}


def leftovers(cache_dir: Path) -> list[str]:
    """Temp and staging files that a finished run should not leave behind."""
    out = []
    for sub in (".tmp", ".staging"):
        d = cache_dir / sub
        if d.exists():
            out += [f"{sub}/{p.name}" for p in d.iterdir()]
    return out
