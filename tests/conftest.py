"""Session-wide real services for the test suite.

Every service is a real server on 127.0.0.1. A service that is missing or does not start
FAILS the tests that need it, with a message naming it; nothing is skipped.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from tests.support.procs import ServerProcess, ServiceError
from tests.support.proxy import Proxy
from tests.support.registry import RegistryServer
from tests.support.s3 import S3Server

AUTH_USER = "alice"
AUTH_PASSWORD = "s3cret-pw"
# LAYERWARM_TEST_REDIS_URL lets two checkouts run their suites at once on one machine.
REDIS_URL = os.environ.get("LAYERWARM_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")

S = TypeVar("S", bound=ServerProcess)


def _start(factory: Callable[[], S]) -> S:
    """Build and start a service, turning ``ServiceError`` into a clean test failure."""
    try:
        server = factory()
        server.start()
    except ServiceError as exc:
        message = str(exc)
    else:
        return server
    pytest.fail(message, pytrace=False)


@pytest.fixture(scope="session")
def registry() -> Iterator[RegistryServer]:
    """A docker-registry without auth, shared by the session (use distinct repo names)."""
    server = _start(RegistryServer)
    yield server
    server.cleanup()


@pytest.fixture(scope="session")
def auth_registry() -> Iterator[RegistryServer]:
    """A docker-registry with htpasswd basic auth for alice / s3cret-pw."""
    server = _start(lambda: RegistryServer(htpasswd=(AUTH_USER, AUTH_PASSWORD)))
    yield server
    server.cleanup()


@pytest.fixture(scope="session")
def s3() -> Iterator[S3Server]:
    """A moto_server S3 endpoint shared by the session (use distinct bucket names)."""
    server = _start(S3Server)
    yield server
    server.cleanup()


@pytest.fixture
def registry_proxy(registry: RegistryServer) -> Iterator[Proxy]:
    """A fresh counting/fault proxy in front of the session registry."""
    with Proxy(registry.url) as proxy:
        yield proxy


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    """An empty directory to use as LAYERWARM_CACHE_DIR."""
    path = tmp_path / "cache"
    path.mkdir()
    return path


@pytest.fixture
def docker_config(tmp_path: Path, auth_registry: RegistryServer) -> Path:
    """A DOCKER_CONFIG directory whose config.json holds alice's credentials for auth_registry."""
    path = tmp_path / "docker-config"
    path.mkdir()
    token = base64.b64encode(f"{AUTH_USER}:{AUTH_PASSWORD}".encode()).decode()
    config = {"auths": {auth_registry.host: {"auth": token}}}
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


@pytest.fixture(scope="session")
def redis_url() -> str:
    """URL of the test Redis (127.0.0.1:6379, started by .ci/run); fails if it does not answer."""
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
        return REDIS_URL
    except redis.RedisError as exc:
        message = (
            f"Redis does not answer at {REDIS_URL} ({exc}); start it with "
            "redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save '' --appendonly no"
        )
    pytest.fail(message, pytrace=False)
