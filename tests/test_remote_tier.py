"""The remote tier: one conformance suite run against every implementation.

DirectoryTier runs on tmp_path; S3Tier against a real moto S3 server over HTTP (the
session `s3` fixture), once below a key prefix and once at the bucket root. Then the
parts only one implementation has: URL parsing, S3 failure modes, directory crash safety.
"""

from __future__ import annotations

import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from boto3.s3.transfer import TransferConfig
from botocore.exceptions import ClientError

from pipeline.digest import Digest
from pipeline.errors import (
    NotFound,
    PermanentError,
    RemoteTierUnavailable,
    Unauthorized,
    UsageError,
)
from pipeline.tiers import RemoteEntry, RemoteTier, open_remote
from pipeline.tiers.directory import DirectoryTier
from pipeline.tiers.s3 import S3Tier
from tests.support.s3 import S3Server

MiB = 1024 * 1024
# Small parts so a 12 MiB layer goes multipart (S3's minimum part is 5 MiB) and stays fast.
SMALL_TRANSFER = TransferConfig(
    multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB, max_concurrency=4
)


def metadata_for(digest: Digest, size: int) -> dict[str, str]:
    return {
        "diff-id": str(digest),
        "media-type": "application/vnd.oci.image.layer.v1.tar+gzip",
        "compressed-size": str(size // 2),
        "uncompressed-size": str(size),
    }


def make_layer(
    directory: Path, size: int, seed: int, algorithm: str = "sha256"
) -> tuple[Digest, Path]:
    """A file of `size` pseudo-random bytes, and the digest of its content."""
    data = random.Random(seed).randbytes(size)
    digest = Digest.of_bytes(data, algorithm)
    path = directory / f"layer-{seed}-{size}"
    path.write_bytes(data)
    return digest, path


@pytest.fixture(autouse=True)
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Dummy credentials through the standard chain; nothing from the host's AWS config."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)


@dataclass
class Backend:
    """A tier plus raw access to its storage, to plant junk and check the layout."""

    tier: RemoteTier
    put_raw: Callable[[str, bytes], None]  # name relative to the root / prefix
    raw_names: Callable[[], set[str]]  # every stored name, relative, temp/meta excluded
    multipart_parts: Callable[[str], int | None]  # parts of a stored object, if multipart


def directory_backend(root: Path) -> Backend:
    def put_raw(name: str, data: bytes) -> None:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    def raw_names() -> set[str]:
        return {
            str(p.relative_to(root))
            for p in root.rglob("*")
            if p.is_file() and p.relative_to(root).parts[0] not in (".tmp", ".meta")
        }

    return Backend(DirectoryTier(root), put_raw, raw_names, lambda name: None)


def s3_backend(server: S3Server, prefix: str) -> Backend:
    bucket = server.create_bucket(f"layers-{uuid.uuid4().hex[:12]}")
    client = server.client()
    base = f"{prefix}/" if prefix else ""

    def put_raw(name: str, data: bytes) -> None:
        client.put_object(Bucket=bucket, Key=base + name, Body=data)

    def raw_names() -> set[str]:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
        keys = {obj["Key"] for page in pages for obj in page.get("Contents", [])}
        return {key[len(base) :] if key.startswith(base) else f"<outside>{key}" for key in keys}

    def multipart_parts(name: str) -> int | None:
        etag = client.head_object(Bucket=bucket, Key=base + name)["ETag"].strip('"')
        return int(etag.split("-")[1]) if "-" in etag else None

    tier = S3Tier(bucket, prefix, endpoint_url=server.endpoint_url, transfer_config=SMALL_TRANSFER)
    return Backend(tier, put_raw, raw_names, multipart_parts)


@pytest.fixture(params=["directory", "s3-prefix", "s3-root"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "directory":
        return directory_backend(tmp_path / "remote")
    server: S3Server = request.getfixturevalue("s3")
    return s3_backend(server, "layers/prod" if request.param == "s3-prefix" else "")


@pytest.fixture
def work(tmp_path: Path) -> Path:
    path = tmp_path / "work"
    path.mkdir()
    return path


# -- conformance: every implementation ---------------------------------------------------


def test_stat_of_missing_layer_is_none(backend: Backend, work: Path) -> None:
    digest, _ = make_layer(work, 100, seed=1)
    assert backend.tier.stat(digest) is None


def test_connect_makes_no_entry_and_the_tier_works_after(backend: Backend, work: Path) -> None:
    backend.tier.connect()
    assert list(backend.tier.list()) == []
    digest, src = make_layer(work, 100, seed=2)
    backend.tier.upload(digest, src, {})
    assert backend.tier.stat(digest) is not None


def test_upload_stat_download_round_trip(backend: Backend, work: Path) -> None:
    tier = backend.tier
    digest, src = make_layer(work, 70_001, seed=2)
    metadata = metadata_for(digest, 70_001)
    tier.upload(digest, src, metadata)

    entry = tier.stat(digest)
    assert entry == RemoteEntry(digest, 70_001, metadata)
    assert backend.raw_names() == {digest.cache_name}  # `<prefix>/sha256_<hex>`, nothing else

    dest = work / "downloaded"
    dest.write_bytes(b"stale content longer than nothing" * 10_000)  # must be truncated
    assert tier.download(digest, dest) == entry
    assert dest.read_bytes() == src.read_bytes()


def test_empty_layer_round_trip(backend: Backend, work: Path) -> None:
    digest, src = make_layer(work, 0, seed=3)
    backend.tier.upload(digest, src, metadata_for(digest, 0))
    assert backend.tier.stat(digest) == RemoteEntry(digest, 0, metadata_for(digest, 0))
    dest = work / "out"
    assert backend.tier.download(digest, dest).size == 0
    assert dest.read_bytes() == b""


def test_multipart_round_trip_reports_progress(backend: Backend, work: Path) -> None:
    size = 12 * MiB + 123
    digest, src = make_layer(work, size, seed=4)
    sent: list[int] = []
    backend.tier.upload(digest, src, metadata_for(digest, size), progress=sent.append)
    assert sum(sent) == size
    assert len(sent) > 1  # increments, not one final total

    parts = backend.multipart_parts(digest.cache_name)
    assert parts in (None, 3)  # None for the directory tier; 5 + 5 + 2 MiB on S3
    if isinstance(backend.tier, S3Tier):
        assert parts == 3

    received: list[int] = []
    dest = work / "big"
    entry = backend.tier.download(digest, dest, progress=received.append)
    assert entry.size == size and sum(received) == size
    assert Digest.of_bytes(dest.read_bytes()) == digest


def test_stream_hands_over_the_bytes_in_order_and_reads_ranges(
    backend: Backend, work: Path
) -> None:
    """What a restore hashes as it copies, and what the read path reads: the same bytes."""
    size = 3 * MiB + 7
    digest, src = make_layer(work, size, seed=5)
    backend.tier.upload(digest, src, metadata_for(digest, size))
    got, received = bytearray(), []
    assert backend.tier.stream(digest, got.extend, progress=received.append) == size
    assert bytes(got) == src.read_bytes() and sum(received) == size
    data = src.read_bytes()
    assert backend.tier.read_range(digest, 1_000_000, 4096) == data[1_000_000:1_004_096]
    assert backend.tier.read_range(digest, size - 3, 100) == data[-3:]
    missing, _ = make_layer(work, 10, seed=6)
    with pytest.raises(NotFound):
        backend.tier.stream(missing, got.extend)


def test_reupload_is_harmless(backend: Backend, work: Path) -> None:
    digest, src = make_layer(work, 5_000, seed=5)
    backend.tier.upload(digest, src, metadata_for(digest, 5_000))
    backend.tier.upload(digest, src, metadata_for(digest, 5_000))
    assert [e.digest for e in backend.tier.list()] == [digest]


def test_list_returns_exactly_the_entries(backend: Backend, work: Path) -> None:
    layers = [make_layer(work, 1_000 + i, seed=10 + i) for i in range(3)]
    layers.append(make_layer(work, 777, seed=20, algorithm="sha512"))
    for digest, src in layers:
        backend.tier.upload(digest, src, metadata_for(digest, src.stat().st_size))

    other = Digest.of_bytes(b"not an entry here")
    for junk in [
        "README.txt",
        "sha256_abc",
        f"sha256:{other.hex}",
        f"SHA256_{other.hex.upper()}",
        f"{other.cache_name}.part",
        f"{other.cache_name}.json",
        f"sub/{other.cache_name}",
    ]:
        backend.put_raw(junk, b"junk")

    listed = list(backend.tier.list())
    assert sorted((e.digest, e.size) for e in listed) == sorted(
        (d, s.stat().st_size) for d, s in layers
    )
    assert backend.tier.stat(other) is None


def test_delete(backend: Backend, work: Path) -> None:
    tier = backend.tier
    keep, keep_src = make_layer(work, 300, seed=30)
    gone, gone_src = make_layer(work, 400, seed=31)
    tier.upload(keep, keep_src, metadata_for(keep, 300))
    tier.upload(gone, gone_src, metadata_for(gone, 400))

    assert tier.delete(gone) is True
    assert tier.stat(gone) is None
    assert [e.digest for e in tier.list()] == [keep]
    with pytest.raises(NotFound):
        tier.download(gone, work / "x")
    assert tier.delete(gone) is False
    assert tier.stat(keep) is not None


def test_download_of_missing_layer_is_not_found(backend: Backend, work: Path) -> None:
    digest, _ = make_layer(work, 10, seed=40)
    dest = work / "never"
    with pytest.raises(NotFound, match=digest.hex):
        backend.tier.download(digest, dest)
    assert not dest.exists()


def test_metadata_that_s3_cannot_carry_is_refused(backend: Backend, work: Path) -> None:
    digest, src = make_layer(work, 10, seed=41)
    for bad in ({"Diff_ID": "x"}, {"media-type": "caf\u00e9"}, {"media-type": "a\nb"}):
        with pytest.raises(UsageError):
            backend.tier.upload(digest, src, bad)
    assert backend.tier.stat(digest) is None


def test_one_tier_shared_by_threads(backend: Backend, work: Path) -> None:
    # The S3 client is created lazily under a lock; many first uses race for it.
    layers = [make_layer(work, 2_000 + i, seed=50 + i) for i in range(12)]

    def roundtrip(item: tuple[Digest, Path]) -> bool:
        digest, src = item
        backend.tier.upload(digest, src, metadata_for(digest, src.stat().st_size))
        dest = work / f"dl-{digest.hex[:12]}"
        backend.tier.download(digest, dest)
        return dest.read_bytes() == src.read_bytes()

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(roundtrip, layers))
    assert {e.digest for e in backend.tier.list()} == {d for d, _ in layers}


# -- open_remote -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "bucket", "prefix", "shown"),
    [
        ("s3://b", "b", "", "s3://b"),
        ("s3://b/p/q", "b", "p/q", "s3://b/p/q"),
        ("s3://b1/", "b1", "", "s3://b1"),
        ("s3://my-bucket/p/q", "my-bucket", "p/q", "s3://my-bucket/p/q"),
        ("s3://my.bucket/p/q/", "my.bucket", "p/q", "s3://my.bucket/p/q"),
    ],
)
def test_open_remote_s3(url: str, bucket: str, prefix: str, shown: str) -> None:
    tier = open_remote(url)
    assert isinstance(tier, S3Tier)
    assert (tier.bucket, tier.prefix, tier.url) == (bucket, prefix, shown)


@pytest.mark.parametrize(
    ("url", "root"),
    [
        ("file:///x", "/x"),
        ("file:///mnt/nfs/layers/", "/mnt/nfs/layers"),
        ("file://localhost/srv/layers", "/srv/layers"),
        ("file:///srv/my%20layers", "/srv/my layers"),
        ("file:///srv/a/../b", "/srv/b"),
    ],
)
def test_open_remote_directory(url: str, root: str) -> None:
    tier = open_remote(url)
    assert isinstance(tier, DirectoryTier)
    assert tier.root == Path(root)
    assert tier.url.startswith("file:///")


@pytest.mark.parametrize(
    "url",
    [
        "http://x",
        "https://bucket.s3.amazonaws.com/p",
        "gs://bucket",
        "s3://",
        "s3:///prefix",
        "s3://-bucket",
        "s3://bucket name",
        "s3://bucket:9000/p",
        "s3://bucket/a//b",
        "s3://bucket/a/../b",
        "s3://bucket/p?versionId=1",
        "file://relative/path",
        "file:relative/path",
        "relative/path",
        "/abs/path/without/scheme",
        "",
    ],
)
def test_open_remote_rejects(url: str) -> None:
    with pytest.raises(UsageError) as info:
        open_remote(url)
    message = str(info.value)
    assert "\n" not in message
    assert repr(url) in message or "credentials" in message


def test_open_remote_never_echoes_credentials() -> None:
    with pytest.raises(UsageError) as info:
        open_remote("s3://AKIAEXAMPLE:topsecret@bucket/p")
    assert "topsecret" not in str(info.value) and "AKIAEXAMPLE" not in str(info.value)


def test_open_remote_s3_uses_standard_endpoint_variable(
    s3: S3Server, monkeypatch: pytest.MonkeyPatch, work: Path
) -> None:
    bucket = s3.create_bucket(f"env-{uuid.uuid4().hex[:12]}")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3.endpoint_url)
    tier = open_remote(f"s3://{bucket}/cache")
    digest, src = make_layer(work, 1234, seed=60)
    tier.upload(digest, src, metadata_for(digest, 1234))
    head = s3.client().head_object(Bucket=bucket, Key=f"cache/{digest.cache_name}")
    assert head["ContentLength"] == 1234
    assert head["Metadata"] == metadata_for(digest, 1234)


# -- S3 failure modes ----------------------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # closed again on exit: connections are refused


def test_s3_endpoint_down_is_unavailable_quickly(
    monkeypatch: pytest.MonkeyPatch, work: Path
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "SuperSecretValue123")
    tier = S3Tier("layers", "p", endpoint_url=f"http://127.0.0.1:{closed_port()}")
    digest, src = make_layer(work, 10, seed=70)
    for name, operation in [
        (f"stat {digest}", lambda: tier.stat(digest)),
        (f"upload {digest}", lambda: tier.upload(digest, src, {})),
        ("list", lambda: list(tier.list())),
    ]:
        started = time.monotonic()
        with pytest.raises(RemoteTierUnavailable) as info:
            operation()
        assert time.monotonic() - started < 15
        message = str(info.value)
        assert message.startswith(f"remote tier s3://layers/p: {name}: ")
        assert "SuperSecretValue123" not in message and "testing" not in message


def test_s3_missing_bucket_is_a_clear_permanent_error(s3: S3Server, work: Path) -> None:
    tier = S3Tier("no-such-bucket-here", endpoint_url=s3.endpoint_url)
    digest, src = make_layer(work, 10, seed=71)
    for operation in (
        tier.connect,
        lambda: tier.stat(digest),
        lambda: tier.upload(digest, src, {}),
        lambda: list(tier.list()),
    ):
        with pytest.raises(UsageError, match="bucket 'no-such-bucket-here' does not exist"):
            operation()


def test_s3_bucket_deleted_after_first_use_is_still_named(s3: S3Server, work: Path) -> None:
    bucket = s3.create_bucket(f"short-lived-{uuid.uuid4().hex[:8]}")
    tier = S3Tier(bucket, endpoint_url=s3.endpoint_url)
    digest, src = make_layer(work, 10, seed=72)
    assert tier.stat(digest) is None
    s3.client().delete_bucket(Bucket=bucket)
    with pytest.raises(UsageError, match="does not exist"):
        tier.upload(digest, src, {})


def test_s3_accepts_an_injected_client(s3: S3Server, work: Path) -> None:
    bucket = s3.create_bucket(f"injected-{uuid.uuid4().hex[:8]}")
    tier = S3Tier(bucket, "x", client=s3.client())
    digest, src = make_layer(work, 99, seed=73)
    tier.upload(digest, src, metadata_for(digest, 99))
    assert tier.stat(digest) == RemoteEntry(digest, 99, metadata_for(digest, 99))


def client_error(status: int, code: str, headers: dict[str, str] | None = None) -> ClientError:
    response = {
        "Error": {"Code": code, "Message": "server says so"},
        "ResponseMetadata": {"HTTPStatusCode": status, "HTTPHeaders": headers or {}},
    }
    return ClientError(response, "GetObject")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("status", "code", "expected"),
    [
        (404, "NoSuchKey", NotFound),
        (404, "404", NotFound),
        (404, "NoSuchBucket", UsageError),
        (403, "AccessDenied", Unauthorized),
        (400, "InvalidAccessKeyId", Unauthorized),
        (403, "SignatureDoesNotMatch", Unauthorized),
        (503, "SlowDown", RemoteTierUnavailable),
        (500, "InternalError", RemoteTierUnavailable),
        (400, "RequestTimeout", RemoteTierUnavailable),
        (429, "TooManyRequests", RemoteTierUnavailable),
        (400, "InvalidArgument", PermanentError),
    ],
)
def test_s3_error_classification(status: int, code: str, expected: type[Exception]) -> None:
    # moto answers neither 403 nor 503 on demand, so the mapping is checked directly.
    tier = S3Tier("b1", "p")
    error = tier._translate(client_error(status, code), "stat sha256:abc")
    assert type(error) is expected
    assert str(error).startswith("remote tier s3://b1/p: ")


def test_s3_throttling_keeps_retry_after() -> None:
    error = S3Tier("b1")._translate(client_error(503, "SlowDown", {"retry-after": "7"}), "x")
    assert isinstance(error, RemoteTierUnavailable) and error.retry_after == 7.0


# -- DirectoryTier specifics ---------------------------------------------------------------


def test_directory_layout(tmp_path: Path, work: Path) -> None:
    root = tmp_path / "remote"
    tier = DirectoryTier(root)
    digest, src = make_layer(work, 500, seed=80)
    tier.upload(digest, src, metadata_for(digest, 500))
    assert (root / digest.cache_name).read_bytes() == src.read_bytes()
    assert (root / ".meta" / f"{digest.cache_name}.json").is_file()
    assert list((root / ".tmp").iterdir()) == []
    assert tier.url == root.as_uri()
    assert isinstance(open_remote(tier.url), DirectoryTier)


def test_directory_crash_before_rename_leaves_no_entry(
    tmp_path: Path, work: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "remote"
    tier = DirectoryTier(root)
    digest, src = make_layer(work, 3 * MiB, seed=81)
    renames: list[str] = []
    real_replace = os.replace

    def replace(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> None:
        renames.append(Path(b).name)
        if Path(b).name == digest.cache_name:
            raise OSError(5, "Input/output error (simulated crash)")
        real_replace(a, b)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(RemoteTierUnavailable, match="simulated crash"):
        tier.upload(digest, src, metadata_for(digest, 3 * MiB))
    # The sidecar was put in place before the entry's rename was attempted.
    assert renames == [f"{digest.cache_name}.json", digest.cache_name]
    assert not any(p.name.startswith("sha256_") for p in root.iterdir())
    assert tier.stat(digest) is None and list(tier.list()) == []
    assert list((root / ".tmp").iterdir()) == []  # the temp file was cleaned up

    monkeypatch.setattr(os, "replace", real_replace)
    tier.upload(digest, src, metadata_for(digest, 3 * MiB))  # and a retry succeeds
    assert tier.stat(digest) == RemoteEntry(digest, 3 * MiB, metadata_for(digest, 3 * MiB))


def test_directory_writes_nothing_outside_its_root(tmp_path: Path, work: Path) -> None:
    root = tmp_path / "area" / "remote"
    root.parent.mkdir()
    (tmp_path / "area" / "neighbour").write_bytes(b"x")

    def snapshot() -> dict[str, tuple[int, int]]:
        return {
            str(p): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in (tmp_path / "area").rglob("*")
            if root not in p.parents and p != root
        }

    before = snapshot()
    tier = DirectoryTier(root)
    for i, algorithm in enumerate(["sha256", "sha512", "sha256"]):
        digest, src = make_layer(work, 100 + i, seed=90 + i, algorithm=algorithm)
        tier.upload(digest, src, metadata_for(digest, 100 + i))
        tier.download(digest, work / "out")
        assert tier.delete(digest)
    assert snapshot() == before


def test_directory_root_is_created_but_not_its_parents(tmp_path: Path, work: Path) -> None:
    digest, src = make_layer(work, 10, seed=95)
    created = DirectoryTier(tmp_path / "new-root")
    created.upload(digest, src, {})
    assert (tmp_path / "new-root" / digest.cache_name).is_file()

    unmounted = DirectoryTier(tmp_path / "not-mounted" / "layers")
    for operation in (unmounted.connect, lambda: unmounted.stat(digest)):
        with pytest.raises(UsageError, match="does not exist"):
            operation()
    assert not (tmp_path / "not-mounted").exists()

    (tmp_path / "a-file").write_bytes(b"")
    with pytest.raises(UsageError, match="not a directory"):
        DirectoryTier(tmp_path / "a-file").stat(digest)


def test_directory_permission_denied_is_unauthorized(
    tmp_path: Path, work: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # chmod does not stop root (tests often run as root in CI), so refuse the write itself.
    import tempfile

    def refuse(*args: object, **kwargs: object) -> tuple[int, str]:
        raise PermissionError(13, "Permission denied")

    tier = DirectoryTier(tmp_path / "remote")
    digest, src = make_layer(work, 10, seed=96)
    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(Unauthorized, match="permission denied"):
        tier.upload(digest, src, {})
    assert tier.stat(digest) is None


def test_directory_damaged_sidecar_does_not_hide_the_layer(tmp_path: Path, work: Path) -> None:
    root = tmp_path / "remote"
    tier = DirectoryTier(root)
    digest, src = make_layer(work, 10, seed=97)
    tier.upload(digest, src, metadata_for(digest, 10))
    (root / ".meta" / f"{digest.cache_name}.json").write_text("{not json")
    assert tier.stat(digest) == RemoteEntry(digest, 10, {})


def test_directory_concurrent_uploads_of_one_layer(tmp_path: Path, work: Path) -> None:
    # Two workers publishing the same layer at once: last rename wins, content is whole.
    tiers = [DirectoryTier(tmp_path / "remote") for _ in range(2)]
    digest, src = make_layer(work, 2 * MiB, seed=98)
    barrier = threading.Barrier(2)

    def publish(tier: DirectoryTier) -> None:
        barrier.wait()
        tier.upload(digest, src, metadata_for(digest, 2 * MiB))

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(publish, tiers))
    assert (tmp_path / "remote" / digest.cache_name).read_bytes() == src.read_bytes()
    assert list((tmp_path / "remote" / ".tmp").iterdir()) == []
