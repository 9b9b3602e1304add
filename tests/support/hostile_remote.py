"""Plant hostile objects in a remote tier, and check what a run must leave alone.

    Victim            a file outside every tier and cache (root-only, mode 0600) whose
                      bytes and mode must survive any run
    plant_file        a `file://` tier's entry or sidecar as a symlink, FIFO or regular file
    put_object        an S3 object with whatever user metadata an attacker chooses
    run_capped        the real CLI under an address-space cap, so a run that would read
                      /dev/zero whole dies of MemoryError instead of eating the machine
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.cli import layerwarm_cmd, layerwarm_env
from tests.support.fleetcheck import cache_name
from tests.support.images import Layer

MEMORY_CAP = 2 << 30  # bytes of address space for one CLI run


def metadata_for(lay: Layer, uncompressed_size: int | None = None) -> dict[str, str]:
    """What publish writes for `lay` (the uncompressed size may be forged)."""
    return {
        "diff-id": lay.diff_id,
        "media-type": lay.media_type,
        "compressed-size": str(lay.size),
        "uncompressed-size": str(len(lay.tar) if uncompressed_size is None else uncompressed_size),
    }


@dataclass(frozen=True)
class Victim:
    """A private file outside the tier; `untouched()` says whether it still is."""

    path: Path
    data: bytes
    mode: int = 0o600

    @classmethod
    def make(cls, directory: Path, name: str, data: bytes) -> Victim:
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / name
        path.write_bytes(data)
        os.chmod(path, 0o600)
        return cls(path, data)

    def untouched(self) -> bool:
        st = os.lstat(self.path)
        return stat.S_IMODE(st.st_mode) == self.mode and self.path.read_bytes() == self.data


def plant_file(path: Path, kind: str, *, target: Path | None = None,
               data: bytes = b"") -> None:
    """Put `kind` at `path`: "link" (to `target`), "fifo", or "file" (holding `data`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "link":
        assert target is not None
        os.symlink(target, path)
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "file":
        path.write_bytes(data)
    else:
        raise ValueError(f"unknown kind {kind!r}")


def sidecar_bytes(metadata: Mapping[str, str], pad: int = 0) -> bytes:
    """A sidecar as JSON, padded with `pad` spaces (still valid JSON)."""
    return json.dumps(dict(metadata)).encode() + b" " * pad


def read_tier(root: Path, lay: Layer) -> tuple[bytes, dict[str, str]]:
    """The file tier's entry and sidecar for `lay`, both required to be regular files."""
    entry, sidecar = root / cache_name(lay), root / ".meta" / f"{cache_name(lay)}.json"
    for p in (entry, sidecar):
        assert stat.S_ISREG(os.lstat(p).st_mode), f"{p} is not a regular file"
    return entry.read_bytes(), json.loads(sidecar.read_text())


def put_object(client: Any, bucket: str, key: str, body: bytes,
               metadata: Mapping[str, str] | None = None) -> None:
    client.put_object(Bucket=bucket, Key=key, Body=body, Metadata=dict(metadata or {}))


def get_object(client: Any, bucket: str, key: str) -> tuple[bytes, dict[str, str]]:
    obj = client.get_object(Bucket=bucket, Key=key)
    return obj["Body"].read(), dict(obj["Metadata"])


def run_capped(*args: str, cache_dir: Path, env: Mapping[str, str] | None = None,
               timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """The CLI with its address space capped at MEMORY_CAP (prlimit) and a timeout."""
    return subprocess.run(
        ["prlimit", f"--as={MEMORY_CAP}", *layerwarm_cmd(*args)],
        env=layerwarm_env(cache_dir, {"MALLOC_ARENA_MAX": "2", **(env or {})}),
        capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
    )


def lines_naming(stderr: str, what: str) -> list[str]:
    return [line for line in stderr.splitlines() if what in line]
