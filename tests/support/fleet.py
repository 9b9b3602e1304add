"""A fleet of real `layerwarm worker` processes on one machine, for distributed-mode tests.

Each node is a `layerwarm worker --node NAME` subprocess (which itself runs the Celery
workers ``io@NAME`` and ``cpu@NAME``) with its own cache directory, all sharing one
Redis database as broker, one remote tier and one AWS environment. The Redis database is
dedicated to the fleet and flushed when it starts, so runs never see each other's queues.

Also here: ``run_cli`` for the `layerwarm` commands of distributed mode (``submit``,
``status``, ``nodes``, ``flower``); process faults on a node (find, freeze or SIGKILL its
``io@``/``cpu@`` worker the way a crashed machine would, wait for the node to exit, start
it again), with the process tree read by tests/support/proctree.py; ``ThrottledProxy``,
the test proxy with a bandwidth limit per path; ``start_fleet`` / ``running_fleet`` to
build one and ``push`` to give it images. What the tests check of it (cache entries and
S3 objects byte for byte, a job's record) is tests/support/fleetcheck.py.

A startup failure raises ``FleetError`` with the workers' logs; ``start_fleet`` turns it
into a test failure (the one place here that needs pytest).
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Self

from tests.support.cli import layerwarm_env
from tests.support.fleetcheck import S3Tier
from tests.support.images import Image
from tests.support.proctree import Pid, cmdline, descendants
from tests.support.proxy import Proxy, _Handler
from tests.support.registry import RegistryServer

REPO_ROOT = Path(__file__).resolve().parents[2]
TERMINAL_STATES = ("done", "failed")


class FleetError(RuntimeError):
    """The fleet did not start or a command misbehaved; the message holds the logs."""


def cli_cmd(*args: str) -> list[str]:
    """The `layerwarm` command of distributed mode, as the spec says tests call it."""
    return [sys.executable, "-m", "workers.cli", *args]


def broker_url_for(redis_url: str, db: int) -> str:
    """``redis://host:port/<db>`` from any URL of the same Redis server."""
    base = re.sub(r"/\d*$", "", redis_url.rstrip("/"))
    return f"{base}/{db}"


def flush_db(broker_url: str) -> None:
    import redis

    client = redis.Redis.from_url(broker_url, socket_connect_timeout=3)
    try:
        client.flushdb()
    finally:
        client.close()


# ---------------------------------------------------------------- the CLI


def run_cli(
    *args: str, env: Mapping[str, str], timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            cli_cmd(*args),
            env=dict(env),
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            cwd=REPO_ROOT,
        )
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr
        raise FleetError(
            f"`layerwarm {' '.join(args)}` did not finish within {timeout:.0f}s\n"
            f"stdout: {(out or '')[-2000:]}\nstderr: {(err or '')[-3000:]}"
        ) from None


# ---------------------------------------------------------------- the fleet


class Node:
    """One `layerwarm worker --node NAME` subprocess and its cache directory."""

    def __init__(self, name: str, root: Path) -> None:
        self.name = name
        self.root = root
        self.cache_dir = root / "cache"
        self.log_path = root / "worker.stderr"
        self.proc: subprocess.Popen[bytes] | None = None

    def log_tail(self, limit: int = 3000) -> str:
        try:
            return self.log_path.read_bytes()[-limit:].decode(errors="replace")
        except OSError:
            return "(no log)"


class Fleet:
    """N worker nodes sharing a broker DB and a remote tier; see the module docstring.

    ``extra_env`` goes to the workers and to every CLI command (e.g. ``DOCKER_CONFIG``,
    ``AWS_*`` from ``S3Server.env()``).
    """

    def __init__(
        self,
        root: Path,
        nodes: Sequence[str],
        broker_url: str,
        remote_url: str | None = None,
        extra_env: Mapping[str, str] | None = None,
        *,
        io_concurrency: int = 4,
        cpu_concurrency: int = 1,
        visibility_timeout: int = 20,
        lease_ttl: int = 10,
        worker_args: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        self.root = root
        self.broker_url = broker_url
        self.remote_url = remote_url
        self.io_concurrency = io_concurrency
        self.cpu_concurrency = cpu_concurrency
        self.worker_args = dict(worker_args or {})  # node -> more `layerwarm worker` flags
        self.nodes = {name: Node(name, root / "nodes" / name) for name in nodes}
        self.client_cache = root / "client" / "cache"
        self.shared_env: dict[str, str] = {
            "LAYERWARM_BROKER_URL": broker_url,
            "LAYERWARM_VISIBILITY_TIMEOUT": str(visibility_timeout),
            "LAYERWARM_LEASE_TTL": str(lease_ttl),
            "PYTHONUNBUFFERED": "1",
            **({"LAYERWARM_REMOTE": remote_url} if remote_url else {}),
            **(extra_env or {}),
        }

    # -- environment and paths
    def cache_dir(self, node: str) -> Path:
        return self.nodes[node].cache_dir

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """Environment of a CLI command run by a user on a machine that is no node."""
        self.client_cache.parent.mkdir(parents=True, exist_ok=True)
        return layerwarm_env(self.client_cache, {**self.shared_env, **(extra or {})})

    def worker_env(self, node: str) -> dict[str, str]:
        return layerwarm_env(self.cache_dir(node), self.shared_env)

    # -- lifecycle
    def start(self, timeout: float = 60) -> Self:
        flush_db(self.broker_url)
        for node in self.nodes.values():
            node.root.mkdir(parents=True, exist_ok=True)
            node.cache_dir.mkdir(exist_ok=True)
            node.log_path.write_bytes(b"")
            self._spawn(node.name)
        try:
            self.wait_for_nodes(self.nodes, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, name: str) -> None:
        """Start `layerwarm worker --node NAME`, its output appended to the node's log."""
        node = self.nodes[name]
        cmd = cli_cmd(
            "worker", "--node", name,
            "--io-concurrency", str(self.io_concurrency),
            "--cpu-concurrency", str(self.cpu_concurrency),
            "--cache-dir", str(node.cache_dir),
            *self.worker_args.get(name, ()),
        )  # fmt: skip
        with open(node.log_path, "ab") as log:
            node.proc = subprocess.Popen(
                cmd, env=self.worker_env(name), stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, cwd=REPO_ROOT,
            )  # fmt: skip

    def alive(self, name: str) -> bool:
        proc = self.nodes[name].proc
        return proc is not None and proc.poll() is None

    def restart(self, name: str, timeout: float = 60) -> None:
        """Start a node that has exited again: same cache dir, its log appended to."""
        node = self.nodes[name]
        if self.alive(name):
            raise FleetError(f"node {name} is still running; stop it before restarting it")
        # Any orphaned Celery worker of the old supervisor would take the same names.
        if node.proc is not None:
            for pid in descendants(node.proc.pid):
                Pid(pid).signal(signal.SIGKILL)
        with open(node.log_path, "ab") as log:
            log.write(f"\n----- restarted at {time.strftime('%H:%M:%S')} -----\n".encode())
        self._spawn(name)
        self.wait_for_nodes([name], timeout)

    def ensure_all(self) -> None:
        """Start again any node an earlier test left dead."""
        for name in self.nodes:
            if not self.alive(name):
                self.restart(name)

    def wait_exit(self, name: str, timeout: float = 30) -> int:
        """Wait for the node's `layerwarm worker` supervisor to exit; return its code."""
        proc = self.nodes[name].proc
        assert proc is not None
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise FleetError(
                f"`layerwarm worker --node {name}` still runs {timeout:.0f}s after one of its "
                f"Celery workers died\n{self.logs()}"
            ) from None

    def wait_for_nodes(self, names: Iterable[str], timeout: float = 60) -> list[str]:
        """Poll `layerwarm nodes --json` until it lists every name in ``names``."""
        wanted = set(names)
        deadline = time.monotonic() + timeout
        last = "(never ran)"
        while True:
            for node in self.nodes.values():
                if node.proc is not None and node.proc.poll() is not None and node.name in wanted:
                    raise FleetError(
                        f"`layerwarm worker --node {node.name}` exited with code "
                        f"{node.proc.returncode} at start\n{self.logs()}"
                    )
            p = run_cli("nodes", "--json", env=self.env(), timeout=30)
            last = f"exit {p.returncode}, stdout {p.stdout.strip()!r}, stderr {p.stderr[-800:]!r}"
            if p.returncode == 0:
                try:
                    listed = json.loads(p.stdout)
                except ValueError:
                    listed = None
                if isinstance(listed, list) and wanted <= set(listed):
                    return listed
            if time.monotonic() > deadline:
                raise FleetError(
                    f"`layerwarm nodes --json` did not list {sorted(wanted)} within "
                    f"{timeout:.0f}s; last answer: {last}\n{self.logs()}"
                )
            time.sleep(0.5)

    def logs(self) -> str:
        return "\n".join(
            f"--- worker {n.name} ({n.log_path}):\n{n.log_tail()}" for n in self.nodes.values()
        )

    def stop(self, grace: float = 15) -> None:
        """SIGTERM every node (and then SIGKILL whatever of its process tree is left)."""
        tracked: list[Pid] = []
        for node in self.nodes.values():
            if node.proc is None:
                continue
            tracked += [Pid(pid) for pid in descendants(node.proc.pid)]
            if node.proc.poll() is None:
                node.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for node in self.nodes.values():
            if node.proc is None:
                continue
            try:
                node.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                node.proc.kill()
                node.proc.wait()
        while any(p.alive() for p in tracked) and time.monotonic() < deadline:
            time.sleep(0.1)
        for p in tracked:
            p.signal(signal.SIGKILL)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- faults
    def worker_pid(self, node: str, kind: str = "io") -> int:
        """The pid of the Celery worker ``<kind>@<node>`` (kind: io or cpu) under the node."""
        proc = self.nodes[node].proc
        if proc is None or proc.poll() is not None:
            raise FleetError(f"node {node} is not running\n{self.logs()}")
        tree = descendants(proc.pid)
        matching = [pid for pid in tree if f"{kind}@{node}" in cmdline(pid)]
        if not matching:
            lines = "\n".join(f"  {pid}: {cmdline(pid)}" for pid in tree)
            raise FleetError(f"no {kind}@{node} process under pid {proc.pid}:\n{lines}")
        return matching[0]  # breadth first: the topmost one is the worker itself

    def worker_tree(self, node: str, kind: str = "io") -> list[Pid]:
        """The ``<kind>@<node>`` worker and its pool processes, parents first."""
        pid = self.worker_pid(node, kind)
        return [Pid(pid)] + [Pid(p) for p in descendants(pid)]

    def kill9(self, node: str, kind: str = "io") -> list[int]:
        """SIGKILL the ``<kind>@<node>`` worker and its pool processes, like a crashed host.

        The whole subtree dies at once, so no pool child finishes the task on its own.
        Returns the pids killed.
        """
        victims = self.worker_tree(node, kind)
        for p in victims:
            p.signal(signal.SIGKILL)
        return [p.pid for p in victims]

    # -- commands
    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return run_cli(*args, env=self.env(), timeout=timeout)

    def submit(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        return self.run("submit", *args, timeout=timeout)

    def submit_id(self, *args: str) -> str:
        """`submit` without --wait: stdout must be exactly the job id on one line."""
        p = self.submit(*args, timeout=60)
        if p.returncode != 0 or not re.fullmatch(r"[^\s]+\n?", p.stdout):
            raise FleetError(
                f"submit {' '.join(args)}: exit {p.returncode}, stdout {p.stdout!r}, "
                f"stderr {p.stderr[-2000:]!r}"
            )
        return p.stdout.strip()

    def status(self, job_id: str) -> dict[str, Any]:
        """`status JOB --json`, parsed; raises if it does not exit 0 with JSON."""
        p = self.run("status", job_id, "--json", timeout=60)
        if p.returncode != 0:
            raise FleetError(f"status {job_id}: exit {p.returncode}, stderr {p.stderr[-2000:]!r}")
        try:
            return json.loads(p.stdout)
        except ValueError:
            raise FleetError(
                f"status {job_id} --json printed no JSON: {p.stdout[:2000]!r}"
            ) from None

    def wait_done(self, *job_ids: str, timeout: float = 120) -> dict[str, dict[str, Any]]:
        """Poll `status --json` until every job is done or failed; return the last statuses."""
        deadline = time.monotonic() + timeout
        final: dict[str, dict[str, Any]] = {}
        while True:
            for job_id in job_ids:
                if job_id not in final:
                    st = self.status(job_id)
                    if st.get("state") in TERMINAL_STATES:
                        final[job_id] = st
            if len(final) == len(job_ids):
                return final
            if time.monotonic() > deadline:
                pending = {j: self.status(j) for j in job_ids if j not in final}
                raise FleetError(
                    f"jobs not finished within {timeout:.0f}s: "
                    f"{json.dumps(pending, indent=1)[:4000]}\n{self.logs()}"
                )
            time.sleep(0.5)

    def entries(self) -> dict[str, set[str]]:
        """Committed ``sha256_*`` names in each node's cache dir."""
        out = {}
        for name, node in self.nodes.items():
            d = node.cache_dir
            out[name] = {p.name for p in d.iterdir() if p.name.startswith("sha256_")}
        return out


# ---------------------------------------------------------------- a slow proxy


class _ThrottledHandler(_Handler):
    def write(self, data: bytes, chunked: bool) -> None:
        proxy = self.server.proxy  # type: ignore[attr-defined]
        rate, pattern = proxy.throttle
        if rate and pattern is not None and pattern.search(self.path) and data:
            step = 16 * 1024
            for i in range(0, len(data), step):
                super().write(data[i : i + step], chunked)
                self.wfile.flush()
                time.sleep(len(data[i : i + step]) / rate)
            return
        super().write(data, chunked)


class ThrottledProxy(Proxy):
    """``Proxy`` whose response bodies on paths matching a regex go at ``rate`` bytes/s.

    ``throttle_path(regex, rate)`` turns it on; ``unthrottle()`` turns it off for new
    writes at once (a body in flight speeds up on its next chunk).
    """

    def __init__(self, upstream: str) -> None:
        super().__init__(upstream)
        self._throttle_lock = threading.Lock()
        self._throttle: tuple[float, re.Pattern[str] | None] = (0.0, None)
        self._server.RequestHandlerClass = _ThrottledHandler

    @property
    def throttle(self) -> tuple[float, re.Pattern[str] | None]:
        with self._throttle_lock:
            return self._throttle

    def throttle_path(self, path_regex: str, rate: float) -> None:
        with self._throttle_lock:
            self._throttle = (rate, re.compile(path_regex))

    def unthrottle(self) -> None:
        with self._throttle_lock:
            self._throttle = (0.0, None)


# ---------------------------------------------------------------- what fleet tests share


def start_fleet(
    root: Path, nodes: Sequence[str], broker_url: str, tier: S3Tier, env: Mapping[str, str],
    **options: Any,
) -> Fleet:
    """A started ``Fleet`` on ``broker_url`` with ``tier`` as its remote tier (``options``
    go to ``Fleet``); a fleet that does not start fails the test with the workers' logs."""
    import pytest

    fleet = Fleet(root, nodes, broker_url, tier.url, env, **options)
    try:
        return fleet.start()
    except FleetError as exc:
        message = f"the layerwarm worker fleet did not start: {exc}"
    pytest.fail(message, pytrace=False)


@contextmanager
def running_fleet(
    root: Path, nodes: Sequence[str], broker_url: str, tier: S3Tier, env: Mapping[str, str],
    **options: Any,
) -> Iterator[Fleet]:
    """``start_fleet`` for the length of a ``with`` block; every node is stopped after it."""
    fleet = start_fleet(root, nodes, broker_url, tier, env, **options)
    try:
        yield fleet
    finally:
        fleet.stop()


def push(registry: RegistryServer, proxy: Proxy, images: Sequence[Image]) -> list[str]:
    """Push each image to a repo of its own; return refs that go through ``proxy``."""
    refs = []
    for img in images:
        repo = f"t/{uuid.uuid4().hex[:10]}"
        registry.push_image(repo, "1", img)
        refs.append(f"{proxy.host}/{repo}:1")
    return refs
