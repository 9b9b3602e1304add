"""Secrets stay off command lines: the broker's password and Flower's logins.

`/proc/PID/cmdline` is readable by every user of a machine, so a password in the argv of
any process layerwarm starts is a password for everyone. These tests run the real commands
against a Redis that demands a password (given by environment or by file) and walk every
process each command started, from its pid down through /proc/*/stat, reading every
command line. They also check that the secrets still work: the workers reach the
password-protected Redis, and Flower answers 401 without its login and 200 with it.
"""

from __future__ import annotations

import base64
import json
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.support.cli import layerwarm_env
from tests.support.fleet import REPO_ROOT, cli_cmd, run_cli
from tests.support.procs import free_port
from tests.support.proctree import Pid, cmdline, descendants

REDIS_PASSWORD = "redis-pw-7Qx2"
FLOWER_USER, FLOWER_PASSWORD = "admin", "flower-pw-9Kd4"
NODE = "sec1"


class PasswordRedis:
    """A redis-server of our own on a free 127.0.0.1 port that requires a password."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server not found on PATH: apt-get install redis-server",
                        pytrace=False)
        self.port = free_port()
        self.log_path = workdir / "redis.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--requirepass",
                 REDIS_PASSWORD, "--save", "", "--appendonly", "no", "--dir", str(workdir)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )
        self.url = f"redis://:{REDIS_PASSWORD}@127.0.0.1:{self.port}/0"
        self._wait_ready()

    def _wait_ready(self) -> None:
        import redis

        deadline = time.monotonic() + 20
        while True:
            try:
                redis.Redis.from_url(self.url, socket_connect_timeout=1).ping()
                return
            except redis.RedisError as exc:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    pytest.fail(f"redis-server with a password did not start ({exc}): "
                                f"{self.log_path.read_text(errors='replace')[-2000:]}",
                                pytrace=False)
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def password_redis(tmp_path: Path) -> Iterator[PasswordRedis]:
    (tmp_path / "redis").mkdir()
    server = PasswordRedis(tmp_path / "redis")
    yield server
    server.stop()


class Started:
    """A `layerwarm` command run in the background; its log goes to a file."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_path: Path):
        self.name, self.log_path = name, log_path
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(
                cli_cmd(*args), env=env, cwd=REPO_ROOT, stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT,
            )

    def log_tail(self) -> str:
        return self.log_path.read_bytes()[-3000:].decode(errors="replace")

    def tree(self) -> dict[int, str]:
        """pid -> command line of this process and everything it started, still running."""
        pids = [self.proc.pid, *descendants(self.proc.pid)]
        return {pid: cmdline(pid) for pid in pids}

    def stop(self) -> None:
        tracked = [Pid(pid) for pid in descendants(self.proc.pid)]
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for p in tracked:
            p.signal(signal.SIGKILL)


def wait_for(what: str, check: object, procs: list[Started], timeout: float = 90) -> object:
    """Poll `check()` until it returns something truthy; fail with the logs if it never does."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        for p in procs:
            if p.proc.poll() is not None:
                pytest.fail(f"`layerwarm {p.name}` exited with code {p.proc.returncode} "
                            f"while waiting for {what}:\n{p.log_tail()}", pytrace=False)
        try:
            last = check()  # type: ignore[operator]
        except requests.RequestException as exc:
            last = exc
        else:
            if last:
                return last
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {p.name}:\n{p.log_tail()}" for p in procs)
            pytest.fail(f"no {what} within {timeout:.0f}s (last: {last!r})\n{logs}",
                        pytrace=False)
        time.sleep(0.3)


def secret_forms(*secrets: str) -> list[str]:
    """A secret as it could show up: plain, and base64 of itself and of `user:secret`."""
    out = []
    for s in secrets:
        out += [s, base64.b64encode(s.encode()).decode(),
                base64.b64encode(f"{FLOWER_USER}:{s}".encode()).decode()]
    return out


def assert_no_secret_in_argv(procs: list[Started], *secrets: str) -> None:
    for p in procs:
        for pid, line in p.tree().items():
            for secret in secret_forms(*secrets):
                assert secret not in line, (
                    f"`layerwarm {p.name}` started pid {pid} with a secret on its command "
                    f"line: {line.replace(secret, '<SECRET>')}")


def flower_status(url: str, auth: tuple[str, str] | None) -> int:
    return requests.get(f"{url}/api/workers?refresh=1", auth=auth, timeout=20).status_code


def test_worker_flower_beat_keep_passwords_off_command_lines(
    tmp_path: Path, password_redis: PasswordRedis
) -> None:
    broker_file = tmp_path / "broker-url"
    broker_file.write_text(password_redis.url + "\n")
    broker_file.chmod(0o600)
    auth_file = tmp_path / "flower-login"
    auth_file.write_text(f"{FLOWER_USER}:{FLOWER_PASSWORD}\n")
    auth_file.chmod(0o600)
    cache = tmp_path / "cache"
    cache.mkdir()
    base = layerwarm_env(cache, {"PYTHONUNBUFFERED": "1"})
    port = free_port()
    flower_url = f"http://127.0.0.1:{port}"
    flower_auth = (FLOWER_USER, FLOWER_PASSWORD)

    started: list[Started] = []
    try:
        # Three ways in: --broker-file, LAYERWARM_BROKER_URL_FILE, LAYERWARM_BROKER_URL.
        started.append(Started(
            "worker", ["worker", "--node", NODE, "--io-concurrency", "1",
                       "--cpu-concurrency", "1", "--broker-file", str(broker_file)],
            base, tmp_path / "worker.log"))
        started.append(Started(
            "flower", ["flower", "--address", "127.0.0.1", "--port", str(port),
                       "--basic-auth-file", str(auth_file)],
            {**base, "LAYERWARM_BROKER_URL_FILE": str(broker_file)}, tmp_path / "flower.log"))
        started.append(Started(
            "beat", ["beat", "--schedule", str(tmp_path / "beat-schedule")],
            {**base, "LAYERWARM_BROKER_URL": password_redis.url}, tmp_path / "beat.log"))

        # The workers reached the Redis that demands the password: the node is live.
        client_env = {**base, "LAYERWARM_BROKER_URL_FILE": str(broker_file)}

        def node_live() -> bool:
            p = run_cli("nodes", "--json", env=client_env, timeout=30)
            return p.returncode == 0 and NODE in json.loads(p.stdout or "[]")

        wait_for(f"node {NODE} in `layerwarm nodes`", node_live, started)
        # Flower reached it too, and demands its login.
        wait_for("Flower listing the workers", lambda: flower_status(flower_url, flower_auth)
                 == 200 and f"io@{NODE}" in requests.get(
                     f"{flower_url}/api/workers", auth=flower_auth, timeout=20).json(), started)
        assert flower_status(flower_url, None) == 401
        assert flower_status(flower_url, (FLOWER_USER, "wrong")) == 401
        # `layerwarm beat` became Celery beat in place (exec): same pid, beat's own argv.
        wait_for("celery beat running", lambda: "-m celery -A workers.app beat" in cmdline(
            started[2].proc.pid), started)

        # The walk finds the Celery workers themselves, so it is not vacuous.
        worker_lines = started[0].tree().values()
        for kind in ("io", "cpu"):
            assert any(f"{kind}@{NODE}" in line for line in worker_lines), list(worker_lines)
        assert_no_secret_in_argv(started, REDIS_PASSWORD, FLOWER_PASSWORD)
    finally:
        for p in started:
            p.stop()


@pytest.mark.parametrize("how", ["env", "flag"])
def test_flower_login_by_env_or_flag_never_reaches_argv(
    tmp_path: Path, redis_url: str, how: str
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    login = f"{FLOWER_USER}:{FLOWER_PASSWORD}"
    env = layerwarm_env(tmp_path / "cache", {"LAYERWARM_BROKER_URL": redis_url})
    args = ["flower", "--address", "127.0.0.1", "--port", str(port)]
    if how == "env":
        env["LAYERWARM_FLOWER_BASIC_AUTH"] = login
    else:
        args += ["--basic-auth", login]  # the user typed it; Flower must not inherit it
    flower = Started("flower", args, env, tmp_path / "flower.log")
    try:
        wait_for("Flower answering", lambda: flower_status(url, (FLOWER_USER, FLOWER_PASSWORD))
                 == 200, [flower])
        assert flower_status(url, None) == 401
        # `layerwarm flower` became Flower in place (exec): same pid, Flower's own argv.
        line = flower.tree()[flower.proc.pid]
        assert "-m celery -A workers.app flower" in line, line
        assert_no_secret_in_argv([flower], FLOWER_PASSWORD)
    finally:
        flower.stop()


def test_wrong_broker_password_is_one_line_with_the_url_masked(
    tmp_path: Path, password_redis: PasswordRedis
) -> None:
    wrong = password_redis.url.replace(REDIS_PASSWORD, "not-the-pw-3Zq")
    f = tmp_path / "url"
    f.write_text(wrong)
    for args in (["nodes", "--broker-file", str(f)], ["status", "job-1", "--broker-file", str(f)]):
        p = run(args, tmp_path)
        assert p.returncode == 1, p.stderr
        assert p.stderr == (f"layerwarm: broker redis://:**@127.0.0.1:{password_redis.port}/0: "
                            "invalid username-password pair or user is disabled. (set "
                            "--broker, LAYERWARM_BROKER_URL or LAYERWARM_BROKER_URL_FILE)\n")


# ---------------------------------------------------------------- errors (no services)


def run(args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full = layerwarm_env(tmp_path / "cache", env)
    return subprocess.run(cli_cmd(*args), env=full, capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL, cwd=REPO_ROOT)


def test_unreadable_broker_file_is_one_line_usage_error(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-file"
    p = run(["nodes", "--broker-file", str(missing)], tmp_path)
    assert p.returncode == 2
    assert p.stderr == f"layerwarm: cannot read broker URL file {missing}: No such file or " \
                       "directory\n"
    empty = tmp_path / "empty"
    empty.write_text("\n")
    p = run(["status", "some-job"], tmp_path, LAYERWARM_BROKER_URL_FILE=str(empty))
    assert (p.returncode, p.stderr) == (2, f"layerwarm: broker URL file {empty} is empty\n")


def test_broker_url_and_its_file_together_is_usage_error(tmp_path: Path) -> None:
    f = tmp_path / "url"
    f.write_text(f"redis://:{REDIS_PASSWORD}@127.0.0.1:1/0")
    p = run(["nodes"], tmp_path, LAYERWARM_BROKER_URL="redis://127.0.0.1:1/0",
            LAYERWARM_BROKER_URL_FILE=str(f))
    assert p.returncode == 2
    assert "LAYERWARM_BROKER_URL and LAYERWARM_BROKER_URL_FILE" in p.stderr
    assert REDIS_PASSWORD not in p.stderr + p.stdout


def test_broker_and_broker_file_flags_exclude_each_other(tmp_path: Path) -> None:
    p = run(["nodes", "--broker", "redis://127.0.0.1:1/0", "--broker-file", "x"], tmp_path)
    assert p.returncode == 2 and "not allowed with argument" in p.stderr


def test_malformed_flower_login_is_usage_error_without_echo(tmp_path: Path) -> None:
    f = tmp_path / "login"
    f.write_text(f"{FLOWER_PASSWORD}\n")  # a password without its user
    p = run(["flower", "--basic-auth-file", str(f)], tmp_path)
    assert p.returncode == 2
    assert p.stderr.startswith("layerwarm: Flower logins must be USER:PASSWORD")
    assert p.stderr.count("\n") == 1 and FLOWER_PASSWORD not in p.stderr
