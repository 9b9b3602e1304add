"""Helpers for the distributed fault-injection tests (tests/faults/test_*_faults.py).

- ``RedisServer``: a private ``redis-server`` on a free loopback port, optionally with
  AOF persistence, that a test may stop and start again on the same port and directory
  (the shared Redis on 6379 is never restarted).
- ``S3Proxy``: the fault proxy (``tests.support.proxy.Proxy``) in front of an S3 server,
  which can also slow down uploads (request bodies) or hold an upload's last bytes until
  the test releases them, and which never forwards a request whose body was cut short, as
  a real S3 server would not store it either.
- ``layer_states`` of a job status, and ``max_in_window`` for request rates.

Process faults on a fleet's nodes (kill -9 of a worker, restart of a node) are methods of
``tests.support.fleet.Fleet``; ``Known``, ``cache_name``, ``s3_objects`` and ``job_status`` live
in tests/support/fleetcheck.py and are imported here for the tests that take them from here.

Plain Python, no pytest.
"""

from __future__ import annotations

import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Self

from tests.support.fleetcheck import Known, cache_name, job_status, s3_objects
from tests.support.procs import ServiceError, free_port, require_binary
from tests.support.proxy import Hold, Proxy, _Handler

__all__ = [
    "Known", "RedisServer", "S3Proxy", "cache_name", "job_status", "layer_states",
    "max_in_window", "s3_objects",
]

# ---------------------------------------------------------------- a private Redis


class RedisServer:
    """``redis-server`` on 127.0.0.1:<free port> with its files in ``workdir``.

    ``appendonly=True`` turns on the AOF (``appendfsync everysec``; a SIGTERM flushes it),
    which is what a production broker needs for queued Celery messages to survive a
    restart: without persistence a restarted Redis comes back empty, and every queued and
    unacknowledged task (and every job record and lease) is gone. ``stop()`` + ``start()``
    restart it on the same port with the same directory.
    """

    def __init__(self, workdir: Path, *, appendonly: bool = False) -> None:
        self.binary = require_binary(
            "redis-server", "install the Debian package redis-server (apt-get install redis-server)"
        )
        self.workdir = Path(workdir)
        self.appendonly = appendonly
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.workdir / "redis.log"

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def log_tail(self, limit: int = 3000) -> str:
        try:
            return self.log_path.read_bytes()[-limit:].decode(errors="replace")
        except OSError:
            return "(no log)"

    def _command(self) -> list[str]:
        return [
            self.binary, "--bind", "127.0.0.1", "--port", str(self.port),
            "--save", "", "--appendonly", "yes" if self.appendonly else "no",
            "--dir", str(self.workdir), "--logfile", str(self.log_path),
            "--daemonize", "no",
        ]  # fmt: skip

    def start(self, timeout: float = 15) -> Self:
        if self._proc is not None and self._proc.poll() is None:
            return self
        self.workdir.mkdir(parents=True, exist_ok=True)
        first = self.port == 0
        for _attempt in range(3 if first else 1):
            if first:
                self.port = free_port()
            self._proc = subprocess.Popen(
                self._command(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.STDOUT, cwd=self.workdir,
            )  # fmt: skip
            if self._wait_ready(timeout):
                return self
            self._kill()
            if "address already in use" not in self.log_tail().lower():
                break
        raise ServiceError(
            f"redis-server did not answer PING on 127.0.0.1:{self.port} within {timeout:.0f}s; "
            f"its log ({self.log_path}):\n{self.log_tail()}"
        )

    def _wait_ready(self, timeout: float) -> bool:
        import redis

        deadline = time.monotonic() + timeout
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=1)
        try:
            while time.monotonic() < deadline:
                if self._proc is None or self._proc.poll() is not None:
                    return False
                try:
                    if client.ping():
                        return True
                except redis.BusyLoadingError:
                    pass  # still loading the AOF
                except redis.RedisError:
                    pass
                time.sleep(0.05)
        finally:
            client.close()
        return False

    def stop(self, timeout: float = 15) -> None:
        """SIGTERM (Redis flushes its AOF and exits), then wait for the process to go."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._proc = None

    def _kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._proc = None

    def restart(self) -> float:
        """Stop and start again on the same port and directory; return the seconds it was down."""
        started = time.monotonic()
        self.stop()
        self.start()
        return time.monotonic() - started

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---------------------------------------------------------------- S3 behind a fault proxy


class _Truncated(Exception):
    """The client went away before sending the whole request body."""


class _S3Handler(_Handler):
    def read_body(self) -> bytes:
        proxy: S3Proxy = self.server.proxy  # type: ignore[attr-defined]
        length = self.headers.get("Content-Length")
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower() or not length:
            return super().read_body()
        want = int(length)
        parts: list[bytes] = []
        got = 0
        hold = proxy.upload_hold_for(self.command, self.path)
        stop = hold.stop_at(want) if hold is not None else None
        while got < want:
            if hold is not None and stop is not None and got >= stop:
                hold.block(self.path)  # all but the held bytes are in; the sender waits
                stop = None
            rate = proxy.upload_rate if self.command in ("PUT", "POST") else 0.0
            step = min(want - got, 16 * 1024 if rate else 1 << 20)
            if stop is not None:
                step = min(step, stop - got)
            data = self.rfile.read(step)
            if not data:
                raise _Truncated(f"{self.command} {self.path}: body ended at {got} of {want}")
            parts.append(data)
            got += len(data)
            proxy.note_upload(len(data))
            if rate:
                time.sleep(len(data) / rate)
        return b"".join(parts)


class S3Proxy(Proxy):
    """``Proxy`` in front of an S3 server, for the ``AWS_ENDPOINT_URL_S3`` of workers.

    ``throttle_uploads(rate)`` makes the proxy read request bodies of PUT/POST at ``rate``
    bytes a second (a slow link to the store), so a publish lasts long enough to be
    interrupted; ``unthrottle()`` lifts it at once. A request whose body stops short
    (its sender was killed) is dropped, never forwarded with a shorter Content-Length.
    The fault rules of ``Proxy`` (``fail``, ``fail_for`` ...) apply as usual.
    """

    def __init__(self, upstream: str) -> None:
        super().__init__(upstream)
        self._rate_lock = threading.Lock()
        self._upload_rate = 0.0
        self._uploaded = 0
        self._upload_holds: list[tuple[re.Pattern[str], Hold]] = []
        self.dropped: list[str] = []
        self._server.RequestHandlerClass = _S3Handler

    @property
    def upload_rate(self) -> float:
        with self._rate_lock:
            return self._upload_rate

    @property
    def uploaded(self) -> int:
        """Request body bytes received so far (all requests)."""
        with self._rate_lock:
            return self._uploaded

    def hold_upload(self, path_regex: str, tail: int) -> Hold:
        """Read each matching PUT body to ``tail`` bytes short of its end, then stop reading
        until the returned ``Hold`` is released (see ``tests.support.proxy.Hold``): the
        upload is provably under way, and nothing reaches S3 before the release."""
        hold = Hold(tail)
        with self._rate_lock:
            self._upload_holds.append((re.compile(path_regex), hold))
        return hold

    def upload_hold_for(self, method: str, path: str) -> Hold | None:
        if method != "PUT":
            return None
        with self._rate_lock:
            for pattern, hold in self._upload_holds:
                if pattern.search(path) and not hold.released:
                    return hold
        return None

    def release_holds(self) -> None:
        with self._rate_lock:
            holds, self._upload_holds = [h for _p, h in self._upload_holds], []
        for hold in holds:
            hold.release()
        super().release_holds()

    def note_upload(self, n: int) -> None:
        with self._rate_lock:
            self._uploaded += n

    def throttle_uploads(self, rate: float) -> None:
        with self._rate_lock:
            self._upload_rate = float(rate)

    def unthrottle(self) -> None:
        with self._rate_lock:
            self._upload_rate = 0.0

    def env(self, base: Mapping[str, str]) -> dict[str, str]:
        """``base`` (e.g. ``S3Server.env()``) with the S3 endpoint pointing at this proxy."""
        return {**base, "AWS_ENDPOINT_URL_S3": self.url}

    def _serve(self, req: _Handler) -> tuple[int, int]:
        try:
            return super()._serve(req)
        except _Truncated as exc:
            with self._lock:
                self.dropped.append(str(exc))
            req.close_connection = True
            return 0, 0


# ---------------------------------------------------------------- job status, rates


def layer_states(status: Mapping[str, Any] | None) -> dict[str, str]:
    if not status:
        return {}
    return {x["digest"]: x["state"] for x in status["layers"]}


def max_in_window(times: Iterable[float], window: float = 1.0) -> int:
    """The most timestamps that fall in any half-open interval of ``window`` seconds."""
    ordered = sorted(times)
    best, start = 0, 0
    for end, t in enumerate(ordered):
        while t - ordered[start] >= window:
            start += 1
        best = max(best, end - start + 1)
    return best
