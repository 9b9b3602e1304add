"""Flower (Celery's web monitor) over a real fleet: `layerwarm flower` shows the io@/cpu@
workers and every stage task with a readable name and small arguments, and no registry
credential ever reaches it (the fleet pulls from a registry with basic auth)."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import AUTH_PASSWORD, AUTH_USER
from tests.support.fleet import REPO_ROOT, Fleet, FleetError, broker_url_for, cli_cmd
from tests.support.images import Image, Layer, random_tar
from tests.support.procs import free_port
from tests.support.registry import RegistryServer
from tests.support.s3 import S3Server
from workers.tasks import INLINE_DECOMPRESS_BYTES

FLOWER_DB = 9
PREFIX = "layers"
NODES = ("a", "b")
FLOWER_AUTH = ("admin", "flower-pw")
STAGES = ("layerwarm.fetch", "layerwarm.decompress", "layerwarm.publish")
SECRETS = (
    AUTH_PASSWORD,
    base64.b64encode(f"{AUTH_USER}:{AUTH_PASSWORD}".encode()).decode(),
    base64.b64encode(AUTH_PASSWORD.encode()).decode(),
)


@pytest.fixture
def fleet(tmp_path: Path, redis_url: str, s3: S3Server, docker_config: Path) -> Iterator[Fleet]:
    bucket = s3.create_bucket(f"flower-{uuid.uuid4().hex[:8]}")
    f = Fleet(
        tmp_path / "fleet", NODES, broker_url_for(redis_url, FLOWER_DB),
        f"s3://{bucket}/{PREFIX}", {**s3.env(), "DOCKER_CONFIG": str(docker_config)},
    )
    message = None
    try:
        f.start()
    except FleetError as exc:
        message = f"the layerwarm worker fleet did not start: {exc}"
    if message:
        pytest.fail(message, pytrace=False)
    yield f
    f.stop()


class Flower:
    """`layerwarm flower` on a free port with basic auth; its log goes to a file."""

    def __init__(self, fleet: Fleet, log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.responses: list[str] = []  # every API body read, for the credential check
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(
                cli_cmd(
                    "flower", "--address", "127.0.0.1", "--port", str(self.port),
                    "--basic-auth", ":".join(FLOWER_AUTH),
                ),
                env=fleet.env(), cwd=REPO_ROOT, stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT,
            )

    def log_tail(self) -> str:
        return self.log_path.read_bytes()[-3000:].decode(errors="replace")

    def get(self, path: str, auth: tuple[str, str] | None = FLOWER_AUTH) -> requests.Response:
        response = requests.get(self.url + path, auth=auth, timeout=20)
        self.responses.append(response.text)
        return response

    def api(self, path: str) -> Any:
        response = self.get(path)
        assert response.status_code == 200, (path, response.status_code, response.text[:500])
        return response.json()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def flower(fleet: Fleet, tmp_path: Path) -> Iterator[Flower]:
    """Flower, started before any job so that it sees every task event."""
    server = Flower(fleet, tmp_path / "flower.log")
    want = {f"{kind}@{n}" for kind in ("io", "cpu") for n in NODES}
    deadline = time.monotonic() + 60
    seen: object = None
    try:
        while True:
            if server.proc.poll() is not None:
                pytest.fail(
                    f"`layerwarm flower` exited with code {server.proc.returncode}:\n"
                    f"{server.log_tail()}", pytrace=False,
                )
            try:
                response = server.get("/api/workers?refresh=1")
                if response.status_code == 200:
                    seen = sorted(response.json())
                    if want <= set(seen):
                        break
                else:
                    seen = (response.status_code, response.text[:300])
            except requests.RequestException as exc:
                seen = exc
            if time.monotonic() > deadline:
                pytest.fail(
                    f"Flower at {server.url} did not list {sorted(want)} within 60s "
                    f"(last: {seen}):\n{server.log_tail()}\n{fleet.logs()}", pytrace=False,
                )
            time.sleep(0.5)
        yield server
    finally:
        server.stop()


def test_flower_shows_workers_and_stage_tasks_without_credentials(
    fleet: Fleet, flower: Flower, auth_registry: RegistryServer
) -> None:
    # Larger than INLINE_DECOMPRESS_BYTES, so each layer goes through all three stage tasks.
    layers = [
        Layer(random_tar(2000, 900_000), "gzip"),
        Layer(random_tar(2001, 800_000), "zstd"),
        Layer(random_tar(2002, 400_000), "none"),
    ]
    assert min(x.size for x in layers) > INLINE_DECOMPRESS_BYTES
    refs = []
    for img in (Image(layers[:2]), Image([layers[0], layers[2]], format="docker")):
        r = f"t/{uuid.uuid4().hex[:10]}"
        auth_registry.push_image(r, "1", img)
        refs.append(f"{auth_registry.host}/{r}:1")

    # Workers: exactly the io@ and cpu@ worker of every node.
    workers = flower.api("/api/workers?refresh=1")
    assert set(workers) == {f"{kind}@{n}" for kind in ("io", "cpu") for n in NODES}
    assert flower.get("/api/workers", auth=None).status_code == 401, "API open without auth"

    p = fleet.submit(*refs, "--to", "remote", "--wait", "--json")
    assert p.returncode == 0, f"{p.stderr[-3000:]}\n{fleet.logs()}"
    job_id = json.loads(p.stdout)["id"]

    # Tasks: poll until every stage of every layer is reported finished.
    hexes = {lay.digest.removeprefix("sha256:") for lay in layers}
    deadline = time.monotonic() + 30
    while True:
        tasks = flower.api("/api/tasks")
        ours = {
            tid: t for tid, t in tasks.items() if str(t.get("name", "")).startswith("layerwarm.")
        }
        finished = {
            (t["name"], h)
            for t in ours.values() if t.get("state") == "SUCCESS"
            for h in hexes if h in f"{t.get('args')}{t.get('kwargs')}"
        }
        if {(s, h) for s in STAGES for h in hexes} <= finished:
            break
        assert time.monotonic() < deadline, (
            f"Flower never showed every stage task finished; has {sorted(finished)}\n"
            f"{json.dumps(ours, indent=1)[:3000]}\n{flower.log_tail()}"
        )
        time.sleep(1)

    names = {t["name"] for t in ours.values()}
    assert names <= {"layerwarm.plan", *STAGES}, names
    assert "layerwarm.plan" in names
    plans = [t for t in ours.values() if t["name"] == "layerwarm.plan"]
    assert any(job_id in f"{t['args']}{t['kwargs']}" for t in plans), plans

    hosts: dict[str, dict[str, str]] = {}
    for t in ours.values():
        args = f"{t.get('args')}{t.get('kwargs')}"
        assert len(args) < 2000, f"{t['name']} arguments are not small: {args[:300]}..."
        # A bytes literal starts a value (after "(", "[", "," or a space); "node:b'" is a name.
        assert not re.search(r"(?<![\w:.-])b['\"]", args), f"{t['name']} got bytes: {args[:300]}"
        if t["name"] in STAGES and t.get("state") == "SUCCESS":
            kind, _, node = str(t["worker"]).partition("@")
            want = "cpu" if t["name"] == "layerwarm.decompress" else "io"
            assert kind == want, f"{t['name']} ran on {t['worker']}"
            for h in hexes:
                if h in args:
                    hosts.setdefault(h, {})[t["name"]] = node
    for h in hexes:
        assert len(set(hosts[h].values())) == 1, f"stages of {h[:12]} ran on different hosts"

    # Credentials: nowhere in anything Flower serves, nor in the logs.
    for tid in ours:
        flower.api(f"/api/task/info/{tid}")
    flower.api("/api/workers?refresh=1")
    served = "\n".join(flower.responses)
    logs = "".join(n.log_path.read_text(errors="replace") for n in fleet.nodes.values())
    logs += flower.log_path.read_text(errors="replace") + p.stdout + p.stderr
    for secret in SECRETS:
        assert secret not in served, f"Flower serves the registry credential ({secret[:4]}…)"
        assert secret not in logs, f"a log shows the registry credential ({secret[:4]}…)"
