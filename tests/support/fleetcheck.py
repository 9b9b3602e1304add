"""What the fleet tests check, read straight from where the fleet leaves it: every cache
entry and S3 object byte for byte against the layers a test pushed (``Known``, ``S3Tier``),
and a job's record in Redis (``job_status``, ``by_digest``, ``wait_layer``, ``node_of``).
What a stage left unfinished in a cache is tests/support/cli.py's ``leftovers``.

The fleet itself (its processes, faults on its nodes) is tests/support/fleet.py.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tests.support.images import Layer
from tests.support.s3 import S3Server

if TYPE_CHECKING:
    from tests.support.fleet import Fleet


def cache_name(layer: Layer) -> str:
    return "sha256_" + layer.digest.removeprefix("sha256:")


def s3_objects(client: Any, bucket: str, prefix: str) -> dict[str, bytes]:
    """Object bytes under ``prefix/``, by name below the prefix."""
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            body = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
            out[obj["Key"].removeprefix(prefix + "/")] = body
    return out


@dataclass(frozen=True)
class S3Tier:
    """A fleet's remote tier in S3, as a test reads it: straight from the S3 server."""

    s3: S3Server
    bucket: str
    prefix: str = "layers"

    @classmethod
    def new(cls, s3: S3Server, label: str) -> S3Tier:
        """A fresh bucket, so a test or module sees only its own objects."""
        return cls(s3, s3.create_bucket(f"{label}-{uuid.uuid4().hex[:8]}"))

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def objects(self) -> dict[str, bytes]:
        return s3_objects(self.s3.client(), self.bucket, self.prefix)


class Known:
    """Every layer a test module pushed, by cache name, with its decompressed tar."""

    def __init__(self) -> None:
        self.tars: dict[str, bytes] = {}

    def add(self, layer: Layer) -> Layer:
        self.tars[cache_name(layer)] = layer.tar
        return layer

    def _check(self, where: str, name: str, data: bytes, what: str) -> list[str]:
        expected = self.tars.get(name)
        if expected is None:
            return [f"{where}: unknown {what} {name}"]
        if data != expected:
            return [f"{where}: {name} is corrupt or partial ({len(data)} bytes, "
                    f"expected {len(expected)})"]
        return []

    def check_dir(self, where: str, directory: Path) -> list[str]:
        """Problems with the ``sha256_*`` files in ``directory`` (empty list: all good)."""
        if not directory.is_dir():
            return []
        return [problem for path in sorted(directory.iterdir()) if path.name.startswith("sha256_")
                for problem in self._check(where, path.name, path.read_bytes(), "entry")]

    def check_objects(self, where: str, objects: Mapping[str, bytes]) -> list[str]:
        return [problem for key, data in sorted(objects.items())
                for problem in (self._check_index(where, key, data) if key.endswith(".index")
                                else self._check(where, key, data, "object"))]

    def _check_index(self, where: str, key: str, data: bytes) -> list[str]:
        """A layer's file index beside it: it must describe that layer's tar, every file's
        digest matching the bytes at its offset (what a reader of the tier relies on); a
        file larger than the index's chunk size has a digest per chunk instead."""
        import hashlib

        from pipeline.digest import Digest
        from pipeline.errors import LayerwarmError
        from pipeline.fileindex import LayerIndex

        tar = self.tars.get(key.removesuffix(".index"))
        if tar is None:
            return [f"{where}: an index of an unknown layer: {key}"]
        try:
            index = LayerIndex.loads(data, expect=Digest.parse(
                "sha256:" + hashlib.sha256(tar).hexdigest()))
        except LayerwarmError as e:
            return [f"{where}: {key}: {e}"]
        def digests(content: bytes) -> tuple[str, tuple[str, ...]]:
            """(digest, chunks) as the index must give them for `content`."""
            step = index.chunk_size
            if len(content) <= step:
                return hashlib.sha256(content).hexdigest(), ()
            return "", tuple(hashlib.sha256(content[at:at + step]).hexdigest()
                             for at in range(0, len(content), step))

        bad = [e.path for e in index.entries if e.kind == "file"
               and (e.digest, e.chunks) != digests(tar[e.offset:e.offset + e.size])]
        return [f"{where}: {key}: wrong digests for {bad[:3]}"] if bad else []

    def problems(self, fleet: Fleet, tier: S3Tier) -> list[str]:
        """Every cache entry on every node and every object in ``tier`` that is not a whole,
        known layer."""
        found = self.check_objects("S3", tier.objects())
        for name, node in fleet.nodes.items():
            found += self.check_dir(f"node {name}", node.cache_dir)
        return found


def job_status(broker_url: str, job_id: str) -> dict[str, Any] | None:
    """The job's status as `layerwarm status --json` computes it, read straight from Redis
    (fast to poll). None when Redis does not answer (e.g. while it restarts) or the job is
    unknown."""
    import redis

    from workers.jobs import JobStore

    client = redis.Redis.from_url(broker_url, socket_connect_timeout=1, socket_timeout=2)
    try:
        return JobStore(client, 3600).status(job_id)
    except redis.RedisError:
        return None
    finally:
        client.close()


def wait_layer(fleet: Fleet, job_id: str, digest: str, wanted: Sequence[str], *,
               allowed: Sequence[str], timeout: float = 60) -> dict[str, Any]:
    """Poll the job record until layer ``digest`` is in a ``wanted`` state; return its entry.

    Fails if the layer shows a state outside ``allowed`` + ``wanted`` first (it got past
    the stage the test wants to catch). Meant for a stage the test holds (a ``Hold``), so
    that the wanted state lasts until the test has seen it.
    """
    deadline = time.monotonic() + timeout
    while True:
        entry = by_digest(job_status(fleet.broker_url, job_id)).get(digest)
        state = entry["state"] if entry else None  # None: the job is not planned yet
        if entry is not None and state in wanted:
            return entry
        assert state is None or state in allowed, (
            f"layer {digest} got to {state!r} before it was seen in {list(wanted)}: {entry}"
        )
        assert time.monotonic() < deadline, (
            f"layer {digest} not {list(wanted)} within {timeout:.0f}s: {entry}\n{fleet.logs()}"
        )
        time.sleep(0.05)


def by_digest(status: Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
    """A job status's layer entries by digest (an unknown job: none)."""
    return {x["digest"]: x for x in (status or {}).get("layers", [])}


def node_of(fleet: Fleet, host: str | None) -> str:
    """The node a status ``host`` names (``b``, or a worker name like ``io@b``)."""
    assert host is not None, "a layer in progress or done has no host in the status"
    node = re.sub(r"^(io|cpu)@", "", host)
    assert node in fleet.nodes, f"status host {host!r} is none of the nodes {sorted(fleet.nodes)}"
    return node
