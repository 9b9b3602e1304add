"""Helpers for the distributed fault-injection tests (tests/faults/test_*_faults.py).

- ``RedisServer``: a private ``redis-server`` on a free loopback port, optionally with
  AOF persistence, that a test may stop and start again on the same port and directory
  (the shared Redis on 6379 is never restarted).
- ``S3Proxy``: the fault proxy (``tests.support.proxy.Proxy``) in front of an S3 server,
  which can also slow down uploads (request bodies), and which never forwards a request
  whose body was cut short, as a real S3 server would not store it either.
- Process faults on a ``Fleet`` node: find its ``io@``/``cpu@`` Celery worker, freeze and
  SIGKILL it, wait for the node's supervisor to exit, start the node again.
- ``Known``: every layer a test module pushed, by cache name, so any ``sha256_*`` file in
  any cache directory or S3 object can be checked byte for byte.
- ``job_status``: a job's status read straight from Redis (fast polling, and tolerant of
  a Redis that is restarting), and ``max_in_window`` for request rates.

Plain Python, no pytest.
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Self

from tests.support.fleet import REPO_ROOT, Fleet, FleetError, _Pid, cli_cmd, cmdline, descendants
from tests.support.images import Layer
from tests.support.procs import ServiceError, free_port, require_binary
from tests.support.proxy import Proxy, _Handler

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
        while got < want:
            rate = proxy.upload_rate if self.command in ("PUT", "POST") else 0.0
            step = min(want - got, 16 * 1024 if rate else 1 << 20)
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


# ---------------------------------------------------------------- fleet process faults


def worker_pid(fleet: Fleet, node: str, kind: str) -> int:
    """The pid of the Celery worker ``<kind>@<node>`` (kind: io or cpu) under the node."""
    proc = fleet.nodes[node].proc
    if proc is None or proc.poll() is not None:
        raise FleetError(f"node {node} is not running\n{fleet.logs()}")
    tree = descendants(proc.pid)
    matching = [pid for pid in tree if f"{kind}@{node}" in cmdline(pid)]
    if not matching:
        lines = "\n".join(f"  {pid}: {cmdline(pid)}" for pid in tree)
        raise FleetError(f"no {kind}@{node} process under pid {proc.pid}:\n{lines}")
    return matching[0]  # breadth first: the topmost one is the worker itself


def worker_tree(fleet: Fleet, node: str, kind: str) -> list[_Pid]:
    pid = worker_pid(fleet, node, kind)
    return [_Pid(pid)] + [_Pid(p) for p in descendants(pid)]


def freeze(victims: Iterable[_Pid]) -> None:
    """SIGSTOP: the processes stop where they are (so a fast stage cannot finish first)."""
    for p in victims:
        p.signal(signal.SIGSTOP)


def kill9(victims: Iterable[_Pid]) -> list[int]:
    victims = list(victims)
    for p in victims:
        p.signal(signal.SIGKILL)
    return [p.pid for p in victims]


def kill9_worker(fleet: Fleet, node: str, kind: str) -> list[int]:
    """SIGKILL the ``<kind>@<node>`` Celery worker (and any pool children), like a crash."""
    return kill9(worker_tree(fleet, node, kind))


def wait_node_exit(fleet: Fleet, node: str, timeout: float = 30) -> int:
    """Wait for the node's ``layerwarm worker`` supervisor to exit; return its code."""
    proc = fleet.nodes[node].proc
    assert proc is not None
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise FleetError(
            f"`layerwarm worker --node {node}` still runs {timeout:.0f}s after one of its "
            f"Celery workers died\n{fleet.logs()}"
        ) from None


def node_alive(fleet: Fleet, node: str) -> bool:
    proc = fleet.nodes[node].proc
    return proc is not None and proc.poll() is None


def restart_node(fleet: Fleet, node: str, timeout: float = 60) -> None:
    """Start ``layerwarm worker --node NODE`` again, same cache dir, log appended."""
    n = fleet.nodes[node]
    if node_alive(fleet, node):
        raise FleetError(f"node {node} is still running; stop it before restarting it")
    # Any orphaned Celery worker of the old supervisor would take the same names.
    if n.proc is not None:
        for pid in descendants(n.proc.pid):
            _Pid(pid).signal(signal.SIGKILL)
    cmd = cli_cmd(
        "worker", "--node", node,
        "--io-concurrency", str(fleet.io_concurrency),
        "--cpu-concurrency", str(fleet.cpu_concurrency),
        "--cache-dir", str(n.cache_dir),
    )  # fmt: skip
    with open(n.log_path, "ab") as log:
        log.write(f"\n----- restarted at {time.strftime('%H:%M:%S')} -----\n".encode())
        log.flush()
        n.proc = subprocess.Popen(
            cmd, env=fleet.worker_env(node), stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT, cwd=REPO_ROOT,
        )  # fmt: skip
    fleet.wait_for_nodes([node], timeout)


def ensure_all_nodes(fleet: Fleet) -> None:
    """Restart any node an earlier test left dead."""
    for name in fleet.nodes:
        if not node_alive(fleet, name):
            restart_node(fleet, name)


# ---------------------------------------------------------------- content checks


def cache_name(layer: Layer) -> str:
    return "sha256_" + layer.digest.removeprefix("sha256:")


class Known:
    """Every layer a test module pushed, by cache name, with its decompressed tar."""

    def __init__(self) -> None:
        self.tars: dict[str, bytes] = {}

    def add(self, layer: Layer) -> Layer:
        self.tars[cache_name(layer)] = layer.tar
        return layer

    def check_dir(self, where: str, directory: Path) -> list[str]:
        """Problems with the ``sha256_*`` files in ``directory`` (empty list: all good)."""
        problems = []
        if not directory.is_dir():
            return problems
        for path in sorted(directory.iterdir()):
            if not path.name.startswith("sha256_"):
                continue
            expected = self.tars.get(path.name)
            if expected is None:
                problems.append(f"{where}: unknown entry {path.name}")
                continue
            data = path.read_bytes()
            if data != expected:
                problems.append(
                    f"{where}: {path.name} is corrupt or partial ({len(data)} bytes, "
                    f"expected {len(expected)})"
                )
        return problems

    def check_objects(self, where: str, objects: Mapping[str, bytes]) -> list[str]:
        problems = []
        for key, data in sorted(objects.items()):
            expected = self.tars.get(key)
            if expected is None:
                problems.append(f"{where}: unknown object {key}")
            elif data != expected:
                problems.append(
                    f"{where}: {key} is corrupt or partial ({len(data)} bytes, "
                    f"expected {len(expected)})"
                )
        return problems


def s3_objects(client: Any, bucket: str, prefix: str) -> dict[str, bytes]:
    """Object bytes under ``prefix/``, by name below the prefix."""
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            body = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
            out[obj["Key"].removeprefix(prefix + "/")] = body
    return out


# ---------------------------------------------------------------- job status, rates


def job_status(broker_url: str, job_id: str) -> dict[str, Any] | None:
    """The job's status as `layerwarm status --json` computes it, read straight from Redis.

    None when Redis does not answer (e.g. while it restarts) or the job is unknown.
    """
    import redis

    from workers.jobs import JobStore

    client = redis.Redis.from_url(broker_url, socket_connect_timeout=1, socket_timeout=2)
    try:
        return JobStore(client, 3600).status(job_id)
    except redis.RedisError:
        return None
    finally:
        client.close()


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
