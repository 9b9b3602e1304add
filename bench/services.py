"""The servers a benchmark run needs: registry (with the workload pushed), S3, Redis.

The registry is the tests' ``RegistryServer`` (``docker-registry serve``) with its storage
kept in the workload cache directory, so a rerun finds every blob already there. Pushing
uses cross-repository mounts, so a layer shared by many images is uploaded once.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import requests

from bench.workload import Workload, _log
from tests.support.images import Image
from tests.support.procs import ServiceError, free_port, require_binary
from tests.support.registry import RegistryServer


def start_registry(storage: Path) -> RegistryServer:
    storage.mkdir(parents=True, exist_ok=True)
    reg = RegistryServer(
        extra_config={"storage": {"filesystem": {"rootdirectory": str(storage)}}}
    )
    return reg.start()


def _manifest_present(reg: RegistryServer, repo: str, tag: str, image: Image) -> bool:
    r = reg.session.head(
        f"{reg.url}/v2/{repo}/manifests/{tag}",
        headers={"Accept": image.manifest_media_type}, timeout=30,
    )  # fmt: skip
    return r.status_code == 200 and r.headers.get("Docker-Content-Digest") == image.manifest_digest


def _mount(reg: RegistryServer, repo: str, digest: str, source: str) -> bool:
    r = reg.session.post(
        f"{reg.url}/v2/{repo}/blobs/uploads/", params={"mount": digest, "from": source}, timeout=30
    )
    if r.status_code == 202:  # not mounted, an upload was started instead: cancel it
        loc = r.headers.get("Location", "")
        if loc:
            reg.session.delete(loc if loc.startswith("http") else reg.url + loc, timeout=30)
    return r.status_code == 201


def push_workload(reg: RegistryServer, workload: Workload) -> None:
    """Push every image of ``workload`` (skipping those already there, by digest)."""
    started = time.monotonic()
    where: dict[str, str] = {}  # blob digest -> a repo that has it
    pushed = 0
    for name, image in workload.images.items():
        repo, tag = name.rsplit(":", 1)
        if _manifest_present(reg, repo, tag, image):
            for lay in image.layers:
                where.setdefault(lay.digest, repo)
            continue
        for lay in image.layers:
            src = where.get(lay.digest)
            if not (src and src != repo and _mount(reg, repo, lay.digest, src)):
                reg.push_blob(repo, lay.blob)
            where[lay.digest] = repo
        reg.push_blob(repo, image.config_bytes())
        reg.push_manifest(repo, tag, image.manifest_bytes(), image.manifest_media_type)
        pushed += 1
    if pushed:
        _log(f"pushed {pushed} images in {time.monotonic() - started:.0f}s")


class RedisServer:
    """A private ``redis-server`` on a free loopback port (no persistence)."""

    def __init__(self, workdir: Path) -> None:
        self.binary = require_binary("redis-server", "apt-get install redis-server")
        self.workdir = workdir
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self) -> RedisServer:
        import redis

        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc = subprocess.Popen(
            [self.binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir), "--daemonize", "no"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=1)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                if client.ping():
                    return self
            except redis.RedisError:
                time.sleep(0.05)
            if self.proc.poll() is not None:
                break
        self.stop()
        raise ServiceError(f"redis-server did not start on 127.0.0.1:{self.port}")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def blob_url(reg_url: str, repo: str, digest: str) -> str:
    return f"{reg_url}/v2/{repo}/blobs/{digest}"


def check_registry(reg: RegistryServer) -> None:
    requests.get(reg.url + "/v2/", timeout=10).raise_for_status()
