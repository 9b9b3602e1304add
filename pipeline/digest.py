"""Digests as values: strict parsing before a digest becomes a path, key or lock name.

A `Digest` only exists for well-formed input (`sha256:` + 64 lowercase hex, or `sha512:` +
128), so code holding one can use `cache_name` as a file name or object key without
further checks. `Verifier` hashes bytes as they stream and says whether they matched;
`verify()` hands back a `Verified`, the one proof the disk tier's commit accepts that bytes
are what a digest says. `hash_file` is the one way a file on disk is hashed.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import DigestMismatch, InvalidDigest, SizeMismatch
from pipeline.nofollow import open_file

CHUNK = 1 << 20  # bytes per read when hashing or copying a file
_HEX_LENGTHS = {"sha256": 64, "sha512": 128}
_PATTERN = re.compile(r"(sha256|sha512)[:_]([0-9a-f]+)")


@dataclass(frozen=True, order=True)
class Digest:
    algorithm: str
    hex: str

    def __post_init__(self) -> None:
        want = _HEX_LENGTHS.get(self.algorithm)
        if want is None:
            raise InvalidDigest(f"unsupported digest algorithm {self.algorithm!r}")
        if len(self.hex) != want or not re.fullmatch(r"[0-9a-f]+", self.hex):
            raise InvalidDigest(f"invalid {self.algorithm} digest hex {self.hex[:80]!r}")

    @classmethod
    def parse(cls, text: str, *, allow_cache_name: bool = False) -> Digest:
        """Parse `sha256:<hex>` (and `sha256_<hex>` when `allow_cache_name`)."""
        if not isinstance(text, str):
            raise InvalidDigest(f"digest must be a string, got {type(text).__name__}")
        m = _PATTERN.fullmatch(text)
        separator_ok = m is not None and (text[len(m.group(1))] == ":" or allow_cache_name)
        if m is None or not separator_ok:
            shown = text if len(text) <= 80 else text[:77] + "..."
            raise InvalidDigest(f"invalid digest {shown!r}: want sha256:<64 hex>")
        return cls(m.group(1), m.group(2))

    @classmethod
    def of_bytes(cls, data: bytes, algorithm: str = "sha256") -> Digest:
        return cls(algorithm, hashlib.new(algorithm, data).hexdigest())

    @property
    def cache_name(self) -> str:
        """The file name / object key of this layer in every tier: `sha256_<hex>`."""
        return f"{self.algorithm}_{self.hex}"

    @property
    def short(self) -> str:
        return f"{self.algorithm}:{self.hex[:12]}"

    def hasher(self) -> hashlib._Hash:
        return hashlib.new(self.algorithm)

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"


class Verifier:
    """Hashes a stream and checks it against an expected digest (and size, when known).

    `what` names the content in error messages, e.g. "layer blob" or "decompressed layer".
    """

    def __init__(self, expected: Digest, *, size: int | None = None, what: str = "content"):
        self.expected = expected
        self.expected_size = size
        self.what = what
        self._hash = expected.hasher()
        self.count = 0

    def update(self, chunk: bytes | memoryview) -> None:
        self._hash.update(chunk)
        self.count += len(chunk)
        if self.expected_size is not None and self.count > self.expected_size:
            raise SizeMismatch(
                f"{self.what} {self.expected}: more than the expected {self.expected_size} bytes"
            )

    def reset(self) -> None:
        """Forget every byte seen (the data is being fetched again from the start)."""
        self._hash = self.expected.hasher()
        self.count = 0

    @property
    def actual(self) -> Digest:
        return Digest(self.expected.algorithm, self._hash.hexdigest())

    def verify(self) -> Verified:
        """Raise unless the bytes seen are exactly the expected ones; the proof that they are."""
        if self.expected_size is not None and self.count != self.expected_size:
            raise SizeMismatch(
                f"{self.what} {self.expected}: got {self.count} bytes, "
                f"expected {self.expected_size}"
            )
        actual = self.actual
        if actual != self.expected:
            raise DigestMismatch(
                f"{self.what} digest mismatch: expected {self.expected}, got {actual}"
            )
        return Verified(actual, self.count)


@dataclass(frozen=True)
class Verified:
    """Bytes that were hashed as they passed and matched: `digest`, `size` bytes long.

    Only `Verifier.verify()` makes one; code that needs to know bytes were verified asks
    for this value rather than trusting that a caller remembered to check.
    """

    digest: Digest
    size: int


def hash_file(path: Path, expected: Digest, size: int | None, what: str) -> Verified:
    """Hash the file at `path` against `expected` (and `size`, when known); the proof.

    Opened without following a symlink: a cache never hashes what a planted link names
    (NotAFile instead, as for anything but a regular file).
    """
    verifier = Verifier(expected, size=size, what=what)
    fd = open_file(path)
    with open(fd, "rb") as f:
        while chunk := f.read(CHUNK):
            verifier.update(chunk)
    return verifier.verify()


def digest_of_file(path: Path, algorithm: str = "sha256") -> tuple[Digest, int]:
    """What the file at `path` hashes to, and its size (for a file with no known digest)."""
    h, n = hashlib.new(algorithm), 0
    fd = open_file(path)
    with open(fd, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            n += len(chunk)
    return Digest(algorithm, h.hexdigest()), n
