"""The container image, built and run for real with podman (issue 15, the image check).

compose/Dockerfile is built on the local stand-in for python:3.11-slim (.ci/base-image),
then its containers run against the tests' own services, as compose runs them but on the
host network: a worker with a fresh named volume as its disk tier, Redis DB ``IMAGE_DB`` as
broker, a bucket on the test S3 server as the shared tier and the test registry (insecure).
From the host, `layerwarm nodes` must list the worker and `submit --wait` to its node and to
the remote tier must succeed, leaving the layers' tars in the volume (owned by the image's
uid 10001) and in S3. A Flower container answers its healthcheck and asks for a login; a
beat container stays up; `podman stop -t 120` (compose's grace period) of the worker ends
with exit code 0. The image must hold only pinned dependencies (compose/constraints.txt).

podman missing, or the base image not built, fails these tests: they never skip.
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import requests

from tests.support.cli import layerwarm_env
from tests.support.fleet import FleetError, broker_url_for, flush_db, run_cli
from tests.support.fleetcheck import Known, S3Tier
from tests.support.images import Image, Layer, random_tar
from tests.support.podman import REPO_ROOT, Podman, PodmanError
from tests.support.procs import free_port
from tests.support.registry import RegistryServer
from tests.support.s3 import S3Server

IMAGE_DB = 4  # this module's Redis database (flushed when the worker container starts)
IMAGE_TAG = "localhost/layerwarm:image-check"
IMAGE_UID = 10001  # compose/Dockerfile's USER
STOP_GRACE = 120  # compose's stop_grace_period: 2m
CACHE = "/var/cache/layerwarm"
FLOWER_AUTH = "admin:image-check-pw"


@dataclass
class Stack:
    podman: Podman
    broker: str
    registry: RegistryServer
    tier: S3Tier
    node: str
    worker: str  # container name
    volume: str
    client_env: dict[str, str]
    s3_env: dict[str, str]
    build_seconds: float

    def cli(self, *args: str, timeout: float = 120) -> tuple[int, str]:
        """Run `layerwarm ARGS` on the host (the client side); (exit code, output)."""
        try:
            p = run_cli(*args, env=self.client_env, timeout=timeout)
        except FleetError as exc:
            return 124, str(exc)
        return p.returncode, f"stdout: {p.stdout[-3000:]}\nstderr: {p.stderr[-3000:]}"

    def worker_logs(self) -> str:
        return self.podman.logs(self.worker)


def _fail(message: str) -> None:
    pytest.fail(message, pytrace=False)


@pytest.fixture(scope="module")
def podman() -> Iterator[Podman]:
    try:
        p = Podman()
    except PodmanError as exc:
        _fail(str(exc))
    yield p
    problems = p.cleanup()
    assert not problems, f"podman cleanup left things behind: {problems}"


@pytest.fixture(scope="module")
def stack(
    podman: Podman, tmp_path_factory: pytest.TempPathFactory, redis_url: str,
    registry: RegistryServer, s3: S3Server,
) -> Stack:
    """The image built, and a worker container live in `layerwarm nodes`."""
    try:
        build_seconds = podman.build(IMAGE_TAG)
    except PodmanError as exc:
        _fail(f"podman build of compose/Dockerfile failed: {exc}")
    broker = broker_url_for(redis_url, IMAGE_DB)
    flush_db(broker)
    tier = S3Tier.new(s3, "image")
    node = f"img-{uuid.uuid4().hex[:6]}"
    volume = podman.volume_create("layerwarm-image-cache")
    worker_env = {
        "LAYERWARM_BROKER_URL": broker,
        "LAYERWARM_REMOTE": tier.url,
        "LAYERWARM_INSECURE_REGISTRIES": registry.host,
        "PYTHONUNBUFFERED": "1",
        **s3.env(),
    }
    worker = podman.start(
        IMAGE_TAG, "layerwarm-image-worker",
        ["worker", "--node", node, "--io-concurrency", "2", "--cpu-concurrency", "1"],
        env=worker_env, volumes=[f"{volume}:{CACHE}"],
    )
    client_root = tmp_path_factory.mktemp("image-client")
    client_env = layerwarm_env(client_root / "cache", worker_env)
    st = Stack(podman, broker, registry, tier, node, worker, volume, client_env, s3.env(),
               build_seconds)
    _wait_for_node(st, timeout=120)
    return st


def _wait_for_node(st: Stack, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = "(never ran)"
    while time.monotonic() < deadline:
        if not st.podman.running(st.worker):
            _fail(f"the worker container exited at start (state {st.podman.state(st.worker)})"
                  f"\n{st.worker_logs()}")
        code, out = st.cli("nodes", "--json", timeout=60)
        last = f"exit {code}, {out}"
        if code == 0:
            try:
                listed = json.loads(out.split("stdout: ", 1)[1].split("\nstderr: ", 1)[0])
            except (IndexError, ValueError):
                listed = None
            if isinstance(listed, list) and st.node in listed:
                return
        time.sleep(1)
    _fail(f"`layerwarm nodes --json` (on the host) did not list the worker container's node "
          f"{st.node} within {timeout:.0f}s; last answer: {last}\n{st.worker_logs()}")


def test_the_image_holds_only_pinned_dependencies(podman: Podman, stack: Stack) -> None:
    pins = {}
    for line in (REPO_ROOT / "compose" / "constraints.txt").read_text().splitlines():
        m = re.match(r"([A-Za-z0-9_.-]+)==([^\s;]+)", line)
        if m:
            pins[re.sub(r"[-_.]+", "-", m[1]).lower()] = m[2]
    p = podman.run_once(IMAGE_TAG, ["list", "--format", "json"], entrypoint="pip")
    assert p.returncode == 0, f"pip list in the image: {p.stdout[-2000:]} {p.stderr[-2000:]}"
    installed = {re.sub(r"[-_.]+", "-", d["name"]).lower(): d["version"]
                 for d in json.loads(p.stdout)}
    tooling = {"pip", "setuptools", "wheel", "layerwarm"}
    unpinned = {n: v for n, v in installed.items() if n not in tooling and n not in pins}
    assert not unpinned, (f"the image holds distributions compose/constraints.txt does not pin "
                          f"(refresh it as its header says): {unpinned}")
    differ = {n: (v, pins[n]) for n, v in installed.items() if n in pins and v != pins[n]}
    assert not differ, f"installed version != pinned version: {differ}"


def test_a_worker_container_takes_jobs_into_its_volume_and_s3(stack: Stack) -> None:
    known = Known()
    layers = [known.add(Layer(random_tar(1500, 700_000), "gzip")),
              known.add(Layer(random_tar(1501, 300_000), "zstd"))]
    repo = f"image-check/{uuid.uuid4().hex[:8]}"
    stack.registry.push_image(repo, "1", Image([layers[0]]))
    stack.registry.push_image(repo, "2", Image([layers[0], layers[1]]))
    ref_node, ref_remote = f"{stack.registry.host}/{repo}:1", f"{stack.registry.host}/{repo}:2"

    for target, ref in ((f"node:{stack.node}", ref_node), ("remote", ref_remote)):
        code, out = stack.cli("submit", "--to", target, "--wait", "--timeout", "150", ref,
                              timeout=200)
        if code != 0:
            _fail(f"`layerwarm submit --to {target} --wait {ref}` exited {code}: the worker "
                  f"container did not take the job\n{out}\n{stack.worker_logs()}")

    mountpoint = stack.podman.volume_mountpoint(stack.volume)
    names = {p.name for p in mountpoint.iterdir() if p.name.startswith("sha256_")}
    wanted = {"sha256_" + layer.digest.removeprefix("sha256:") for layer in layers}
    # node:NAME puts the layer on that node's disk; the remote job's layers come through a
    # worker too (the only one here), which keeps what it fetched on its disk as well.
    assert "sha256_" + layers[0].digest.removeprefix("sha256:") in names, (
        f"no entry for the node job's layer in the volume {stack.volume} ({mountpoint}): "
        f"{sorted(os.listdir(mountpoint))}\n{stack.worker_logs()}")
    problems = known.check_dir(f"volume {stack.volume}", mountpoint)
    assert not problems, problems
    wrong_owner = {n: (mountpoint / n).stat().st_uid for n in names
                   if (mountpoint / n).stat().st_uid != IMAGE_UID}
    assert not wrong_owner, f"cache entries not owned by uid {IMAGE_UID}: {wrong_owner}"
    assert mountpoint.stat().st_uid == IMAGE_UID, (
        f"the fresh volume's root is owned by uid {mountpoint.stat().st_uid}, not {IMAGE_UID}")

    objects = stack.tier.objects()
    missing = wanted - set(objects)
    assert not missing, (f"layers missing from s3://{stack.tier.bucket}/{stack.tier.prefix}: "
                         f"{sorted(missing)}; objects: {sorted(objects)}\n{stack.worker_logs()}")
    problems = known.check_objects(f"s3://{stack.tier.bucket}", objects)
    assert not problems, problems


def test_a_flower_container_answers_its_healthcheck_and_wants_a_login(stack: Stack) -> None:
    port = free_port()
    name = stack.podman.start(
        IMAGE_TAG, "layerwarm-image-flower", ["flower", "--port", str(port)],
        env={"LAYERWARM_BROKER_URL": stack.broker, "FLOWER_BASIC_AUTH": FLOWER_AUTH},
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    health: requests.Response | None = None
    while time.monotonic() < deadline:
        if not stack.podman.running(name):
            _fail(f"the Flower container exited at start\n{stack.podman.logs(name)}")
        try:
            health = requests.get(f"{url}/healthcheck", timeout=5)
            if health.status_code == 200:
                break
        except requests.RequestException:
            pass
        time.sleep(0.5)
    if health is None or health.status_code != 200:
        _fail(f"Flower's /healthcheck did not answer 200 within 90s "
              f"(last: {health.status_code if health else 'no answer'})\n{stack.podman.logs(name)}")
    anonymous = requests.get(f"{url}/", timeout=10)
    assert anonymous.status_code == 401, (
        f"a page without the login answered {anonymous.status_code}, not 401")
    user, password = FLOWER_AUTH.split(":")
    logged_in = requests.get(f"{url}/api/workers", auth=(user, password), timeout=30)
    assert logged_in.status_code == 200, (
        f"with the login: {logged_in.status_code}\n{stack.podman.logs(name)}")


def _compose() -> dict:
    import yaml  # PyYAML comes with moto[server], of the test extra

    return yaml.safe_load((REPO_ROOT / "compose" / "docker-compose.yml").read_text())


def test_compose_builds_once_and_pins_every_image() -> None:
    services = _compose()["services"]
    building = sorted(name for name, svc in services.items() if "build" in svc)
    assert len(building) == 1, f"services with `build:` (one, or v2's builder races): {building}"
    for name, svc in services.items():
        image = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", svc["image"])  # the default of ${VAR:-x}
        assert ":" in image and not image.endswith(":latest"), f"{name}: unpinned {image}"


def test_compose_s3_init_creates_its_bucket_idempotently(podman: Podman, stack: Stack) -> None:
    """s3-init's own command, in the image, against the test S3 server, twice."""
    svc = _compose()["services"]["s3-init"]
    assert svc["depends_on"] == {"s3": {"condition": "service_healthy"}}, svc["depends_on"]
    bucket = f"s3-init-{uuid.uuid4().hex[:8]}"
    env = {**stack.s3_env, "S3_BUCKET": bucket}
    for attempt in (1, 2):
        p = podman.run_once(IMAGE_TAG, [*svc["entrypoint"][1:], *svc["command"]],
                            entrypoint=svc["entrypoint"][0], env=env)
        assert p.returncode == 0, f"s3-init run {attempt}: {p.stdout[-2000:]}{p.stderr[-3000:]}"
    names = [b["Name"] for b in stack.tier.s3.client().list_buckets()["Buckets"]]
    assert bucket in names, f"s3-init made no bucket {bucket}: {names}"


def test_a_beat_container_starts_and_stays_up(stack: Stack) -> None:
    name = stack.podman.start(
        IMAGE_TAG, "layerwarm-image-beat", ["beat", "--schedule", "/tmp/beat-schedule"],
        env={"LAYERWARM_BROKER_URL": stack.broker, "LAYERWARM_GC_INTERVAL": "1h"},
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if not stack.podman.running(name):
            _fail(f"the beat container exited (state {stack.podman.state(name)})\n"
                  f"{stack.podman.logs(name)}")
        if "beat: Starting" in stack.podman.logs(name):
            break
        time.sleep(0.5)
    else:
        _fail(f"the beat container did not say 'beat: Starting...' within 60s\n"
              f"{stack.podman.logs(name)}")
    time.sleep(5)  # and is still up a moment later
    assert stack.podman.running(name), (
        f"the beat container stopped after starting\n{stack.podman.logs(name)}")


def test_the_worker_container_stops_cleanly_within_compose_grace(stack: Stack) -> None:
    """Last in this module: it stops the worker."""
    seconds = stack.podman.stop(stack.worker, STOP_GRACE)
    state = stack.podman.state(stack.worker)
    assert not state.get("Running"), f"still running after podman stop: {state}"
    assert state.get("ExitCode") == 0, (
        f"`podman stop -t {STOP_GRACE}` of the worker: exit code {state.get('ExitCode')} "
        f"after {seconds:.0f}s (137: it was killed)\n{stack.worker_logs()}")
    assert seconds < STOP_GRACE, f"the worker needed {seconds:.0f}s to stop"
