"""podman for the image check (tests/test_image.py): build compose/Dockerfile, run containers.

Every build and run uses ``--network host`` (only loopback traffic: the tests' Redis,
registry and S3 server are on 127.0.0.1) and ``--pull=never`` (nothing comes from a public
container registry: the base image is the local stand-in .ci/base-image builds). Every
container and volume made here is tracked and removed by ``cleanup()``.

A missing podman or base image raises ``PodmanError`` naming what to install or run; the
test turns it into a failure, never a skip.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO_ROOT / "compose" / "Dockerfile"
BASE_IMAGE = "docker.io/library/python:3.11-slim"
# Directories the stand-in base's pip settings name (find-links, file:// indexes), which a
# build mounts read-only at the same path; .ci/base-image records them in this label.
BUILD_VOLUMES_LABEL = "io.layerwarm.ci.build-volumes"


class PodmanError(RuntimeError):
    """podman is missing, or a podman command failed; the message says which and why."""


def _tail(text: str | bytes | None, limit: int = 4000) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return (text or "")[-limit:]


class Podman:
    """The podman CLI, with every container and volume it makes tracked for cleanup."""

    def __init__(self) -> None:
        binary = shutil.which("podman")
        if binary is None:
            raise PodmanError(
                "podman not found on PATH: the image check needs it (Debian: apt-get install "
                "podman runc catatonit debootstrap; .ci/run installs them)"
            )
        self.binary = binary
        self.containers: list[str] = []
        self.volumes: list[str] = []

    # -- plumbing
    def run_cmd(self, *args: str, timeout: float = 120, check: bool = True
                ) -> subprocess.CompletedProcess[str]:
        try:
            p = subprocess.run([self.binary, *args], capture_output=True, text=True,
                               timeout=timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as exc:
            raise PodmanError(f"`podman {' '.join(args)}` did not finish within {timeout:.0f}s"
                              f"\nstderr: {_tail(exc.stderr)}") from None
        if check and p.returncode != 0:
            raise PodmanError(f"`podman {' '.join(args)}` exited {p.returncode}\n"
                              f"stdout: {_tail(p.stdout)}\nstderr: {_tail(p.stderr)}")
        return p

    def image_exists(self, ref: str) -> bool:
        return self.run_cmd("image", "exists", ref, check=False).returncode == 0

    def image_id(self, ref: str) -> str | None:
        p = self.run_cmd("image", "inspect", "--format", "{{.Id}}", ref, check=False)
        return p.stdout.strip() if p.returncode == 0 else None

    # -- images
    def build_volumes(self) -> list[str]:
        """The host directories the base image's pip settings need during a build."""
        if not self.image_exists(BASE_IMAGE):
            raise PodmanError(
                f"the stand-in base image {BASE_IMAGE} is not in podman's storage: run "
                ".ci/base-image (as root; .ci/run does) to build it locally. It is never pulled."
            )
        p = self.run_cmd("image", "inspect", "--format", "{{json .Config.Labels}}", BASE_IMAGE)
        labels = json.loads(p.stdout or "null") or {}
        return [d for d in labels.get(BUILD_VOLUMES_LABEL, "").split() if Path(d).is_dir()]

    def build(self, tag: str, timeout: float = 900) -> float:
        """Build compose/Dockerfile from the repository root as ``tag``; return seconds.

        The layer cache keeps a rebuild fast. The image ``tag`` named before, if this build
        replaced it, is removed (only that one: no prune of anything else on the machine).
        """
        volumes = [arg for d in self.build_volumes() for arg in ("--volume", f"{d}:{d}:ro")]
        before = self.image_id(tag)
        started = time.monotonic()
        self.run_cmd(
            "build", "--network", "host", "--pull=never", "--layers", *volumes,
            "-f", str(DOCKERFILE), "-t", tag, str(REPO_ROOT), timeout=timeout,
        )
        elapsed = time.monotonic() - started
        after = self.image_id(tag)
        if before and after and before != after:
            self.run_cmd("rmi", before, check=False)
        return elapsed

    # -- volumes
    def volume_create(self, prefix: str) -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        self.run_cmd("volume", "create", name)
        self.volumes.append(name)
        return name

    def volume_mountpoint(self, name: str) -> Path:
        p = self.run_cmd("volume", "inspect", "--format", "{{.Mountpoint}}", name)
        return Path(p.stdout.strip())

    # -- containers
    def start(self, image: str, name_prefix: str, args: Sequence[str], *,
              env: Mapping[str, str] | None = None, volumes: Sequence[str] = (),
              init: bool = True, entrypoint: str | None = None) -> str:
        """``podman run -d`` (host network, never a pull); returns the container's name.

        ``init``: as compose's ``init: true`` (catatonit as PID 1 forwards the signals)."""
        name = f"{name_prefix}-{uuid.uuid4().hex[:8]}"
        flags = ["--network", "host", "--pull=never", "--name", name]
        if init:
            flags.append("--init")
        if entrypoint is not None:
            flags += ["--entrypoint", entrypoint]
        for key, value in (env or {}).items():
            flags += ["--env", f"{key}={value}"]
        for volume in volumes:
            flags += ["--volume", volume]
        self.containers.append(name)
        self.run_cmd("run", "-d", *flags, image, *args, timeout=120)
        return name

    def run_once(self, image: str, args: Sequence[str], *, entrypoint: str | None = None,
                 env: Mapping[str, str] | None = None, timeout: float = 120
                 ) -> subprocess.CompletedProcess[str]:
        """``podman run --rm`` to the end; the result, whatever its exit code."""
        flags = ["--rm", "--network", "host", "--pull=never"]
        if entrypoint is not None:
            flags += ["--entrypoint", entrypoint]
        for key, value in (env or {}).items():
            flags += ["--env", f"{key}={value}"]
        return self.run_cmd("run", *flags, image, *args, timeout=timeout, check=False)

    def state(self, name: str) -> dict[str, object]:
        p = self.run_cmd("container", "inspect", "--format", "{{json .State}}", name)
        return json.loads(p.stdout)

    def running(self, name: str) -> bool:
        return bool(self.state(name).get("Running"))

    def logs(self, name: str, limit: int = 6000) -> str:
        p = self.run_cmd("logs", name, check=False, timeout=60)
        return f"--- podman logs {name} (last {limit} chars):\n{_tail(p.stdout + p.stderr, limit)}"

    def stop(self, name: str, grace: int) -> float:
        """``podman stop -t GRACE``; return the seconds it took."""
        started = time.monotonic()
        self.run_cmd("stop", "-t", str(grace), name, timeout=grace + 60)
        return time.monotonic() - started

    def cleanup(self) -> list[str]:
        """Remove every container and volume made here; return what could not be removed."""
        problems = []
        for name in reversed(self.containers):
            # -v: the anonymous volume of the image's VOLUME (in a container given none) too
            p = self.run_cmd("rm", "-f", "-v", "-t", "5", name, check=False, timeout=120)
            if p.returncode != 0 and "no such container" not in p.stderr.lower():
                problems.append(f"container {name}: {p.stderr.strip()}")
        for name in self.volumes:
            p = self.run_cmd("volume", "rm", "-f", name, check=False, timeout=120)
            if p.returncode != 0 and "no such volume" not in p.stderr.lower():
                problems.append(f"volume {name}: {p.stderr.strip()}")
        self.containers.clear()
        self.volumes.clear()
        return problems
