"""Run a real server as a child process on a free loopback port, and stop it cleanly.

Shared by the registry and S3 helpers so both fail the same way: a ``ServiceError``
that names the missing or broken service and shows the tail of its log.
"""

from __future__ import annotations

import atexit
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Self

import requests


class ServiceError(RuntimeError):
    """A test service is missing or failed to start; the message names it."""


def free_port() -> int:
    """Ask the kernel for a free 127.0.0.1 port (the caller binds it soon after)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def require_binary(name: str, hint: str) -> str:
    """Return the path of ``name`` on PATH, or raise ``ServiceError`` saying how to get it."""
    path = shutil.which(name)
    if path is None:
        raise ServiceError(f"{name} not found on PATH: {hint}")
    return path


class ServerProcess:
    """Base for servers run as subprocesses; subclasses say how to configure and probe.

    ``start()`` retries on another port if the chosen one was taken meanwhile.
    """

    name = "server"  # used in error messages
    start_timeout = 20.0
    probe_path = "/"  # GET this until is_ready() says yes

    def __init__(self) -> None:
        self.port = 0
        self.workdir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    # -- hooks for subclasses
    def command(self, port: int) -> list[str]:
        raise NotImplementedError

    def process_env(self) -> dict[str, str] | None:
        """The server's environment (None: this process's)."""
        return None

    @property
    def pid(self) -> int | None:
        """The server process's pid while it runs (the bench counts its CPU)."""
        return self._proc.pid if self._proc is not None else None

    def prepare(self, workdir: Path, port: int) -> None:
        """Write config files into ``workdir`` before the process starts."""

    def is_ready(self, response: requests.Response) -> bool:
        return response.status_code < 500

    # -- common
    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def log_path(self) -> Path:
        assert self.workdir is not None
        return self.workdir / "server.log"

    def log_tail(self, limit: int = 4000) -> str:
        try:
            return self.log_path.read_bytes()[-limit:].decode(errors="replace")
        except OSError:
            return ""

    def start(self) -> Self:
        if self._proc is not None:
            return self
        self.workdir = Path(tempfile.mkdtemp(prefix=f"layerwarm-{self.name}-"))
        for _attempt in range(3):
            self.port = free_port()
            self.prepare(self.workdir, self.port)
            with open(self.log_path, "wb") as log:
                try:
                    proc = self._proc = subprocess.Popen(
                        self.command(self.port),
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        cwd=self.workdir,
                        env=self.process_env(),
                    )
                except OSError as exc:
                    raise ServiceError(f"{self.name} could not be started: {exc}") from exc
            atexit.register(self.stop)
            if self._wait_ready():
                return self
            code = proc.poll()
            self.stop()
            if "address already in use" not in self.log_tail().lower():
                break
        if code is None:
            reason = f"did not answer on {self.url} within {self.start_timeout:.0f}s"
        else:
            reason = f"exited with code {code} at start"
        raise ServiceError(f"{self.name} {reason}; its log ({self.log_path}):\n{self.log_tail()}")

    def _wait_ready(self) -> bool:
        assert self._proc is not None
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return False
            try:
                if self.is_ready(requests.get(self.url + self.probe_path, timeout=2)):
                    return True
            except requests.RequestException:
                pass
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        atexit.unregister(self.stop)

    def cleanup(self) -> None:
        """Stop and delete the working directory (storage, config, log)."""
        self.stop()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
