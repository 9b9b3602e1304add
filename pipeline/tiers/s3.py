"""The remote tier on S3-compatible object storage, through plain boto3.

Plain boto3 and nothing vendor-specific, so it works on AWS S3, MinIO, Ceph RGW, R2 and
the moto server the tests use. Credentials come from the standard AWS chain (environment,
profiles, SSO, instance roles); the endpoint from `AWS_ENDPOINT_URL_S3` (read by boto3
itself) or the `endpoint_url` argument.

Objects are `<prefix>/sha256_<hex>` with the layer metadata as S3 user metadata, and
`<prefix>/sha256_<hex>.index` with its file index (pipeline/fileindex.py). A PUT,
and a multipart upload's completion, is atomic: an object is never visible half-written.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import closing
from pathlib import Path
from typing import Any

import boto3
from boto3.exceptions import Boto3Error, S3UploadFailedError
from boto3.s3.transfer import S3Transfer, TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    CredentialRetrievalError,
    NoCredentialsError,
    NoRegionError,
    ParamValidationError,
    PartialCredentialsError,
    ProfileNotFound,
)
from s3transfer.exceptions import RetriesExceededError as TransferRetriesExceeded

from pipeline.digest import Digest
from pipeline.errors import (
    LayerwarmError,
    NotFound,
    PermanentError,
    RemoteTierUnavailable,
    Unauthorized,
    UsageError,
)
from pipeline.tiers.base import Progress, RemoteEntry, checked_metadata, entry_name

MiB = 1024 * 1024

# Layers range from KiB to GiB. Below 64 MiB one PUT/GET is cheapest; above, 16 MiB parts
# let a failed part be retried alone. Every transfer of a tier shares one transfer manager
# and so one set of 16 request threads (as the AWS CLI shares its 10): a transfer manager
# per call started up to 8 threads for each of a worker's 16 concurrent layers.
DEFAULT_TRANSFER = TransferConfig(
    multipart_threshold=64 * MiB,
    multipart_chunksize=16 * MiB,
    max_concurrency=16,
    use_threads=True,
)

_STREAM_CHUNK = 1 << 20
_BOTO_ERRORS = (ClientError, BotoCoreError, Boto3Error, TransferRetriesExceeded)
_NOT_FOUND_CODES = {"404", "NoSuchKey", "NotFound"}
# Codes that refuse the credentials themselves, not what a policy allows them.
_REFUSED_CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
                             "InvalidToken", "TokenRefreshRequired"}
_AUTH_CODES = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
}
# S3 answers these with 4xx or 503 although waiting and retrying is the right response.
_TRANSIENT_CODES = {
    "SlowDown",
    "ServiceUnavailable",
    "InternalError",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "Throttling",
    "ThrottlingException",
    "TooManyRequests",
}


class S3Tier:
    """A `RemoteTier` in an S3 bucket, optionally below a key prefix.

    `client` (an S3 client) or `endpoint_url` are for tests and special set-ups; normally
    the client is built lazily from the environment. `transfer_config` changes multipart
    thresholds (tests use small ones to exercise multipart quickly).
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        client: Any | None = None,
        transfer_config: TransferConfig | None = None,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        max_attempts: int = 3,
        max_pool_connections: int = 64,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self._endpoint_url = endpoint_url
        self._transfer = transfer_config or DEFAULT_TRANSFER
        self._config = _client_config(
            connect_timeout, read_timeout, max_attempts, max_pool_connections
        )
        self._client = client
        self._bucket_checked = False
        self._lock = threading.Lock()
        self._transfers: S3Transfer | None = None  # made with the client, shared

    def __repr__(self) -> str:
        return f"S3Tier({self.url!r})"

    # -- the RemoteTier protocol -------------------------------------------------------

    def connect(self) -> None:
        self._s3("connect")

    def stat(self, digest: Digest) -> RemoteEntry | None:
        s3 = self._s3(f"stat {digest}")
        try:
            head = s3.head_object(Bucket=self.bucket, Key=self._key(digest))
        except _BOTO_ERRORS as exc:
            error = self._translate(exc, f"stat {digest}")
            if isinstance(error, NotFound):
                return None
            raise error from exc
        return RemoteEntry(digest, int(head["ContentLength"]), dict(head.get("Metadata", {})))

    def download(self, digest: Digest, dest: Path, progress: Progress | None = None) -> RemoteEntry:
        # HEAD first for the metadata; download_file then GETs (in ranges when large).
        entry = self.stat(digest)
        if entry is None:
            raise NotFound(f"remote tier {self.url}: no layer {digest}")
        try:
            # Writes a temp file beside `dest` and renames it onto `dest` when complete.
            self._transfer_manager(f"download {digest}").download_file(
                self.bucket, self._key(digest), os.fspath(dest), callback=progress)
        except _BOTO_ERRORS as exc:
            raise self._translate(exc, f"download {digest}") from exc
        return entry

    def stream(self, digest: Digest, write: Callable[[bytes | memoryview], object],
               progress: Progress | None = None) -> int:
        # One GET read in order (download_file's parallel ranges arrive out of order, and
        # the caller hashes as it goes); many layers restore side by side anyway.
        what = f"download {digest}"
        try:
            body = self._s3(what).get_object(Bucket=self.bucket, Key=self._key(digest))["Body"]
        except _BOTO_ERRORS as exc:
            raise self._translate(exc, what) from exc
        total = 0
        with closing(body):
            while True:
                try:
                    chunk = body.read(_STREAM_CHUNK)
                except (*_BOTO_ERRORS, OSError) as exc:  # botocore wraps urllib3's
                    raise self._translate(exc, what) from exc
                if not chunk:
                    return total
                write(chunk)
                total += len(chunk)
                if progress is not None:
                    progress(len(chunk))

    def read_range(self, digest: Digest, offset: int, length: int) -> bytes:
        what = f"read {digest}"
        try:
            resp = self._s3(what).get_object(
                Bucket=self.bucket, Key=self._key(digest),
                Range=f"bytes={offset}-{offset + max(length, 1) - 1}")
            return resp["Body"].read(length)
        except _BOTO_ERRORS as exc:
            raise self._translate(exc, what) from exc

    def put_index(self, digest: Digest, data: bytes) -> None:
        what = f"upload the file index of {digest}"
        try:
            self._s3(what).put_object(Bucket=self.bucket, Key=self._index_key(digest),
                                      Body=data, ContentType="application/zstd")
        except _BOTO_ERRORS as exc:
            raise self._translate(exc, what) from exc

    def get_index(self, digest: Digest, cap: int) -> bytes | None:
        what = f"read the file index of {digest}"
        try:
            resp = self._s3(what).get_object(Bucket=self.bucket, Key=self._index_key(digest))
            with closing(resp["Body"]) as body:
                data = body.read(cap + 1)
        except _BOTO_ERRORS as exc:
            error = self._translate(exc, what)
            if isinstance(error, NotFound):
                return None
            raise error from exc
        return None if len(data) > cap else data

    def upload(
        self,
        digest: Digest,
        src: Path,
        metadata: Mapping[str, str],
        progress: Progress | None = None,
    ) -> None:
        extra = {
            "Metadata": checked_metadata(self.url, metadata),
            "ContentType": "application/x-tar",
        }
        try:
            # A failed multipart upload is aborted by s3transfer, so no parts linger
            # and the key only ever appears complete.
            self._transfer_manager(f"upload {digest}").upload_file(
                os.fspath(src), self.bucket, self._key(digest), callback=progress,
                extra_args=extra)
        except _BOTO_ERRORS as exc:
            raise self._translate(exc, f"upload {digest}") from exc

    def delete(self, digest: Digest) -> bool:
        # S3 DELETE succeeds whether or not the key exists, so HEAD tells which it was.
        if self.stat(digest) is None:
            return False
        try:
            s3 = self._s3(f"delete {digest}")
            s3.delete_object(Bucket=self.bucket, Key=self._key(digest))
            s3.delete_object(Bucket=self.bucket, Key=self._index_key(digest))
        except _BOTO_ERRORS as exc:
            raise self._translate(exc, f"delete {digest}") from exc
        return True

    def list(self) -> Iterator[RemoteEntry]:
        prefix = f"{self.prefix}/" if self.prefix else ""
        pages = self._s3("list").get_paginator("list_objects_v2")
        try:
            # Delimiter keeps "subdirectories" (other prefixes) out of the listing.
            for page in pages.paginate(Bucket=self.bucket, Prefix=prefix, Delimiter="/"):
                for obj in page.get("Contents", []):
                    digest = entry_name(obj["Key"][len(prefix) :])
                    if digest is not None:
                        modified = obj["LastModified"].timestamp()
                        yield RemoteEntry(digest, int(obj["Size"]), {}, modified)
        except _BOTO_ERRORS as exc:
            raise self._translate(exc, "list") from exc

    # -- helpers ----------------------------------------------------------------------

    def _key(self, digest: Digest) -> str:
        # Only ever from a Digest's cache name: nothing can reach outside the prefix.
        name = digest.cache_name
        return f"{self.prefix}/{name}" if self.prefix else name

    def _index_key(self, digest: Digest) -> str:
        return self._key(digest) + ".index"  # not a cache name: `list` never shows it

    def _transfer_manager(self, what: str) -> S3Transfer:
        """The tier's one transfer manager (its thread pool bounds all its transfers)."""
        client = self._s3(what)
        with self._lock:
            if self._transfers is None:
                self._transfers = S3Transfer(client=client, config=self._transfer)
            return self._transfers

    def _s3(self, what: str) -> Any:
        """The shared client, created once (boto3 sessions are not thread-safe; clients are).

        The first use also checks that the bucket exists: a HEAD on an object in a missing
        bucket is a bare 404, indistinguishable from a missing layer, so without the check
        a misconfigured bucket would look like an empty cache forever.
        """
        if self._client is not None and self._bucket_checked:
            return self._client
        with self._lock:
            if self._client is None:
                try:
                    session = boto3.session.Session()
                    self._client = session.client(
                        "s3", endpoint_url=self._endpoint_url, config=self._config
                    )
                except _BOTO_ERRORS as exc:
                    raise self._translate(exc, f"{what}: create client") from exc
            if not self._bucket_checked:
                self._check_bucket(self._client, what)
                self._bucket_checked = True
            return self._client

    def _check_bucket(self, client: Any, what: str) -> None:
        try:
            client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status == 403:
                # May lack s3:ListBucket yet be allowed objects under the prefix; a HEAD
                # carries no error code, so ask with a GET whether the keys themselves
                # are refused (said once here, not by every layer).
                self._check_credentials(client, what)
                return
            if status == 404:
                raise self._no_bucket() from None
            raise self._translate(exc, what) from exc
        except _BOTO_ERRORS as exc:
            raise self._translate(exc, what) from exc

    def _check_credentials(self, client: Any, what: str) -> None:
        """Raise Unauthorized when S3 refuses these credentials themselves (unknown key,
        bad signature, expired token); a policy's AccessDenied or a missing key passes."""
        try:
            client.get_object(Bucket=self.bucket, Key=self._probe_key())["Body"].close()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in _REFUSED_CREDENTIAL_CODES:
                raise self._translate(exc, what) from None
        except _BOTO_ERRORS:
            pass  # the layers meet it, and say so

    def _probe_key(self) -> str:
        name = ".layerwarm-credentials-probe"  # never written: its absence is the answer
        return f"{self.prefix}/{name}" if self.prefix else name

    def _no_bucket(self) -> UsageError:
        return UsageError(f"remote tier {self.url}: bucket {self.bucket!r} does not exist")

    def _translate(self, exc: BaseException, what: str) -> LayerwarmError:
        """Map a boto3 error to layerwarm's tree. Messages carry codes, never credentials."""
        where = f"remote tier {self.url}: {what}"
        # upload_file re-raises ClientError as S3UploadFailedError, losing the code;
        # the original is still its context.
        if isinstance(exc, S3UploadFailedError) and isinstance(exc.__context__, ClientError):
            exc = exc.__context__
        if isinstance(exc, ClientError):
            return self._translate_client_error(exc, where)
        if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
            return Unauthorized(f"{where}: no usable AWS credentials found ({exc})")
        if isinstance(exc, CredentialRetrievalError):
            return Unauthorized(f"{where}: could not get AWS credentials")
        if isinstance(exc, (ProfileNotFound, NoRegionError, ParamValidationError)):
            return UsageError(f"{where}: {exc}")
        last = getattr(exc, "last_exception", None)  # transfer retries exhausted
        if last is not None:
            exc = last
        # Connection refused/reset, timeouts, truncated bodies: worth another try later.
        return RemoteTierUnavailable(f"{where}: {exc}")

    def _translate_client_error(self, exc: ClientError, where: str) -> LayerwarmError:
        error = exc.response.get("Error", {})
        meta = exc.response.get("ResponseMetadata", {})
        code = str(error.get("Code", ""))
        status = int(meta.get("HTTPStatusCode") or 0)
        detail = f"{code or 'HTTP'} {status}: {error.get('Message') or 'no message'}"
        if code == "NoSuchBucket":
            return self._no_bucket()
        if code in _NOT_FOUND_CODES or status == 404:
            return NotFound(f"{where}: not found")
        if status in (401, 403) or code in _AUTH_CODES:
            return Unauthorized(f"{where}: access denied ({detail})")
        if status >= 500 or status == 429 or code in _TRANSIENT_CODES:
            retry_after = _retry_after(meta.get("HTTPHeaders", {}))
            return RemoteTierUnavailable(f"{where}: {detail}", retry_after=retry_after)
        return PermanentError(f"{where}: {detail}")


def _retry_after(headers: Mapping[str, str]) -> float | None:
    try:
        return float(headers["retry-after"])
    except (KeyError, ValueError):
        return None


def _client_config(
    connect_timeout: float, read_timeout: float, max_attempts: int, max_pool_connections: int
) -> Config:
    options: dict[str, Any] = {
        # Few, quick retries: an unreachable endpoint must fail in seconds; the pipeline
        # retries RemoteTierUnavailable itself with its own backoff.
        "retries": {"max_attempts": max_attempts, "mode": "standard"},
        "connect_timeout": connect_timeout,
        "read_timeout": read_timeout,
        # Many pipeline threads share the client, each transfer with its own 8 threads.
        "max_pool_connections": max_pool_connections,
    }
    # botocore >= 1.36 adds CRC checksums to every request by default, which several
    # S3-compatible stores (older MinIO / Ceph RGW, some gateways) reject. Content is
    # verified by its sha256 end to end anyway, so send them only where required
    # unless the operator chose otherwise through the standard variables.
    if "AWS_REQUEST_CHECKSUM_CALCULATION" not in os.environ:
        options["request_checksum_calculation"] = "when_required"
    if "AWS_RESPONSE_CHECKSUM_VALIDATION" not in os.environ:
        options["response_checksum_validation"] = "when_required"
    return Config(**options)
