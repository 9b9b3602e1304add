"""A fleet of real `layerwarm worker` processes on one machine, for distributed-mode tests.

Each node is a `layerwarm worker --node NAME` subprocess (which itself runs the Celery
workers ``io@NAME`` and ``cpu@NAME``) with its own cache directory, all sharing one
Redis database as broker, one remote tier and one AWS environment. The Redis database is
dedicated to the fleet and flushed when it starts, so runs never see each other's queues.

Also here: ``run_cli`` for the `layerwarm` commands of distributed mode (``submit``,
``status``, ``nodes``, ``flower``), a process-tree helper that SIGKILLs a node's IO worker
the way a crashed machine would, and ``ThrottledProxy``, the test proxy with a bandwidth
limit per path so a fetch lasts long enough to be interrupted.

Plain Python, no pytest: a startup failure raises ``FleetError`` with the workers' logs.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Self

from tests.support.cli import layerwarm_env
from tests.support.proxy import Proxy, _Handler

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


# ---------------------------------------------------------------- process tree (/proc)


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


class _Pid:
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
            cmd = cli_cmd(
                "worker", "--node", node.name,
                "--io-concurrency", str(self.io_concurrency),
                "--cpu-concurrency", str(self.cpu_concurrency),
                "--cache-dir", str(node.cache_dir),
                *self.worker_args.get(node.name, ()),
            )  # fmt: skip
            with open(node.log_path, "wb") as log:
                node.proc = subprocess.Popen(
                    cmd,
                    env=self.worker_env(node.name),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=REPO_ROOT,
                )
        try:
            self.wait_for_nodes(self.nodes, timeout)
        except BaseException:
            self.stop()
            raise
        return self

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
        tracked: list[_Pid] = []
        for node in self.nodes.values():
            if node.proc is None:
                continue
            tracked += [_Pid(pid) for pid in descendants(node.proc.pid)]
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
    def io_worker_pid(self, node: str) -> int:
        """The pid of the Celery worker ``io@NODE``, found under the node's process tree."""
        proc = self.nodes[node].proc
        if proc is None or proc.poll() is not None:
            raise FleetError(f"node {node} is not running\n{self.logs()}")
        tree = descendants(proc.pid)
        matching = [pid for pid in tree if f"io@{node}" in cmdline(pid)]
        if matching:
            return matching[0]  # breadth first: the topmost one is the worker itself
        # Started without a telling command line (e.g. forked in-process): ask the worker.
        from celery import Celery

        app = Celery(broker=self.broker_url)
        stats = app.control.inspect(destination=[f"io@{node}"], timeout=3).stats() or {}
        pid = (stats.get(f"io@{node}") or {}).get("pid")
        if pid in tree:
            return pid
        lines = "\n".join(f"  {pid}: {cmdline(pid)}" for pid in tree)
        raise FleetError(f"no io@{node} process under pid {proc.pid}:\n{lines}")

    def kill9(self, node: str) -> list[int]:
        """SIGKILL the IO worker of ``node`` and its pool processes, like a crashed host.

        The whole subtree dies at once, so no pool child finishes the task on its own.
        Returns the pids killed.
        """
        io_pid = self.io_worker_pid(node)
        victims = [_Pid(io_pid)] + [_Pid(pid) for pid in descendants(io_pid)]
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
