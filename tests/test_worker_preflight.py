"""A worker host that could not do its work refuses to start, in one line, and never shows
as a node: before this check it started, `nodes` listed it, and every job sent to it
failed (or waited) while it looked healthy.

Each case runs a real `layerwarm worker` against the test Redis and checks what an
operator sees: the exit status, one line on stderr saying what to fix, no node claim.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import redis

from tests.support.cli import layerwarm_cmd, layerwarm_env
from tests.support.fleet import broker_url_for
from tests.support.s3 import S3Server
from tests.test_user_errors import BOUND, EXIT_USAGE, OTHER_UID

PREFLIGHT_DB = 3  # this module's Redis database: no worker here ever gets to claim a node
NODE = "preflight"


@pytest.fixture
def broker(redis_url: str) -> str:
    url = broker_url_for(redis_url, PREFLIGHT_DB)
    redis.Redis.from_url(url).flushdb()
    return url


def _without_root_override() -> list[str]:
    """Run as root but without the capabilities that would read any file anyway."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    assert setpriv, "setpriv (util-linux) is needed to drop root's file-permission override"
    return [setpriv, "--bounding-set=-dac_override,-dac_read_search"]


def _worker(broker: str, cache_dir: Path, env: dict[str, str],
            prefix: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*(prefix or []), *layerwarm_cmd("worker", "--node", NODE)],
        env=layerwarm_env(cache_dir, {"LAYERWARM_BROKER_URL": broker, **env}),
        capture_output=True, text=True, timeout=BOUND, stdin=subprocess.DEVNULL)


def _assert_refused(done: subprocess.CompletedProcess[str], broker: str, *words: str) -> None:
    lines = done.stderr.strip().splitlines()
    assert done.returncode == EXIT_USAGE, done.stderr
    assert len(lines) == 1 and lines[0].startswith("layerwarm: "), done.stderr
    assert all(w in lines[0] for w in words), lines[0]
    assert "Traceback" not in done.stderr
    claims = redis.Redis.from_url(broker).keys("layerwarm:node:*")
    assert claims == [], f"a refused worker claimed a node: {claims}"


def test_an_unreadable_docker_config_stops_the_worker(broker: str, tmp_path: Path) -> None:
    """As `docker login` writes it (0600), mounted into a container whose user is another."""
    config = tmp_path / "docker-config"
    config.mkdir()
    (config / "config.json").write_text('{"auths": {}}')
    (config / "config.json").chmod(0o600)
    if os.geteuid() == 0:
        os.chown(config / "config.json", OTHER_UID, OTHER_UID)
    started = time.monotonic()
    done = _worker(broker, tmp_path / "cache", {"DOCKER_CONFIG": str(config)},
                   _without_root_override())
    _assert_refused(done, broker, str(config / "config.json"), "Permission denied")
    assert time.monotonic() - started < BOUND


def test_a_docker_config_that_is_not_json_stops_the_worker(broker: str, tmp_path: Path) -> None:
    config = tmp_path / "docker-config"
    config.mkdir()
    (config / "config.json").write_text("{not json")
    done = _worker(broker, tmp_path / "cache", {"DOCKER_CONFIG": str(config)})
    _assert_refused(done, broker, str(config), "is not valid JSON")


def test_a_cache_dir_the_worker_cannot_write_stops_it(broker: str, tmp_path: Path) -> None:
    cache_dir = tmp_path / "theirs"
    cache_dir.mkdir()
    if os.geteuid() == 0:
        os.chown(cache_dir, OTHER_UID, OTHER_UID)
    cache_dir.chmod(0o755)
    done = subprocess.run(
        [*_without_root_override(), *layerwarm_cmd("worker", "--node", NODE)],
        env=layerwarm_env(cache_dir, {"LAYERWARM_BROKER_URL": broker}),
        capture_output=True, text=True, timeout=BOUND, stdin=subprocess.DEVNULL)
    _assert_refused(done, broker, str(cache_dir), "permission denied")


def test_an_unreachable_remote_tier_stops_the_worker(broker: str, tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nothing listens on: bound, then closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"LAYERWARM_REMOTE": "s3://layers/fleet",
           "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}",
           "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s",
           "AWS_DEFAULT_REGION": "us-east-1"}
    done = _worker(broker, tmp_path / "cache", env)
    _assert_refused(done, broker, "s3://layers/fleet", "does not start without its remote tier")


def test_a_remote_tier_that_refuses_the_credentials_stops_the_worker(
    broker: str, tmp_path: Path
) -> None:
    with S3Server(check_credentials=True) as strict:  # the dummy keys are unknown to it
        done = _worker(broker, tmp_path / "cache",
                       {**strict.env(), "LAYERWARM_REMOTE": "s3://layers/fleet"})
    _assert_refused(done, broker, "s3://layers/fleet", "InvalidAccessKeyId")
