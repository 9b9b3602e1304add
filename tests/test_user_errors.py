"""The mistakes a newcomer makes most, each answered in one line with the README's exit code.

Table-driven: every case runs the real `layerwarm` command in a subprocess and checks what
a user sees: the exit code (2 usage, 1 failure), exactly one `layerwarm:`/`error:` line
naming the problem and what to do, no `Traceback` anywhere, and an end within a bound.
"""

from __future__ import annotations

import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.cli import layerwarm_cmd, layerwarm_env, run_layerwarm
from tests.support.images import Image, Layer, random_tar
from tests.support.registry import RegistryServer
from tests.support.s3 import S3Server

EXIT_FAILED, EXIT_USAGE = 1, 2
BOUND = 60.0  # seconds: "does not hang"; every case here ends in a few


@dataclass(frozen=True)
class Case:
    name: str
    args: tuple[str, ...]
    exit_code: int
    says: tuple[str, ...]  # each must appear in the one error line
    env: dict[str, str] = field(default_factory=dict)


def check_one_line(done, case: Case, started: float) -> None:
    assert time.monotonic() - started < BOUND, f"{case.name}: took too long"
    assert "Traceback" not in done.stderr, f"{case.name}: a traceback:\n{done.stderr}"
    assert done.returncode == case.exit_code, f"{case.name}: exit {done.returncode}\n{done.stderr}"
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, f"{case.name}: not one line:\n{done.stderr}"
    assert lines[0].startswith(("layerwarm:", "error:")), lines[0]
    for text in case.says:
        assert text in lines[0], f"{case.name}: {text!r} not in {lines[0]!r}"


# ---- 1. Redis refused, silent, malformed or not Redis at all ----------------------------

@pytest.fixture(scope="module")
def refused_port() -> int:
    """A port nothing listens on (bound, then closed)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture(scope="module")
def silent_port() -> Iterator[int]:
    """A port whose kernel completes the connect but where nobody ever answers."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(64)  # never accepted: a PING sent there waits for the socket timeout
    yield s.getsockname()[1]
    s.close()


HINT = "LAYERWARM_BROKER_URL"  # what to do: where the broker URL is set
BROKER_COMMANDS = {
    "worker": ("worker", "--node", "a"),
    "nodes": ("nodes",),
    "submit": ("submit", "localhost:5000/x:1"),
    "submit --wait": ("submit", "--wait", "localhost:5000/x:1"),
    "status": ("status", "0123"),
    "status --watch": ("status", "--watch", "0123"),
    "beat": ("beat",),
    "flower": ("flower", "--port", "1"),
}


def broker_cases(refused: int, silent: int) -> list[Case]:
    cases = [Case(f"{name}, Redis refused", (*args, "--broker", f"redis://127.0.0.1:{refused}/0"),
                  EXIT_FAILED, (f"127.0.0.1:{refused}", "refused", "Is Redis running", HINT))
             for name, args in BROKER_COMMANDS.items()]
    cases += [Case(f"{name}, Redis refused (env)", args, EXIT_FAILED,
                   (f"127.0.0.1:{refused}", HINT),
                   {"LAYERWARM_BROKER_URL": f"redis://127.0.0.1:{refused}/0"})
              for name, args in BROKER_COMMANDS.items() if name in ("nodes", "worker")]
    silent_env = {"LAYERWARM_BROKER_URL": f"redis://127.0.0.1:{silent}/0",
                  "LAYERWARM_REDIS_CONNECT_TIMEOUT": "1", "LAYERWARM_REDIS_SOCKET_TIMEOUT": "1"}
    cases += [Case(f"{name}, Redis silent", args, EXIT_FAILED,
                   (f"127.0.0.1:{silent}", "Timeout", HINT), silent_env)
              for name, args in BROKER_COMMANDS.items() if name in ("nodes", "submit", "worker")]
    cases += [
        Case("malformed port", ("nodes", "--broker", "redis://127.0.0.1:notaport/0"), EXIT_USAGE,
             ("malformed Redis URL", "notaport", HINT)),
        Case("malformed scheme", ("submit", "x:1", "--broker", "redis:/127.0.0.1:6379"),
             EXIT_USAGE, ("malformed Redis URL", HINT)),
        Case("malformed (env)", ("worker", "--node", "a"), EXIT_USAGE, ("malformed Redis URL",),
             {"LAYERWARM_BROKER_URL": "redis://host:99999/0"}),
        Case("not a URL", ("nodes", "--broker", "127.0.0.1:6379"), EXIT_USAGE,
             ("only Redis is supported", HINT)),
        Case("http broker", ("nodes", "--broker", "http://127.0.0.1/"), EXIT_USAGE,
             ("only Redis is supported",)),
        Case("amqp broker", ("nodes", "--broker", "amqp://guest:secret@127.0.0.1//"), EXIT_USAGE,
             ("only Redis is supported", "amqp://guest:**@127.0.0.1//")),
        Case("amqp broker, worker", ("worker", "--node", "a"), EXIT_USAGE,
             ("only Redis is supported",), {"LAYERWARM_BROKER_URL": "amqp://127.0.0.1//"}),
        Case("amqp broker, submit", ("submit", "x:1", "--broker", "pyamqp://127.0.0.1//"),
             EXIT_USAGE, ("only Redis is supported",)),
    ]
    return cases


BROKER_CASE_NAMES = [c.name for c in broker_cases(1, 2)]


@pytest.mark.parametrize("name", BROKER_CASE_NAMES)
def test_broker_mistake_is_one_line(name: str, refused_port: int, silent_port: int,
                                    tmp_path: Path) -> None:
    case = next(c for c in broker_cases(refused_port, silent_port) if c.name == name)
    started = time.monotonic()
    done = run_layerwarm(*case.args, cache_dir=tmp_path / "cache", env=case.env, timeout=BOUND)
    check_one_line(done, case, started)


# ---- 2. A cache dir that cannot be one --------------------------------------------------

DIGEST = "sha256:" + "ab" * 32
EMBEDDED_COMMANDS = {
    "warm": ("warm", "localhost:1/x:1"),
    "ls": ("ls",),
    "df": ("df",),
    "gc": ("gc",),
    "metrics": ("metrics",),
    "verify": ("verify",),
    "verify --report": ("verify", "--report"),
    "inspect": ("inspect", DIGEST),
    "usage": ("usage", DIGEST),
    "rm": ("rm", DIGEST),
    "pin --list": ("pin", "--list"),
}
# Where the cache dir is, relative to the test's tmp dir ("/" ones are absolute): `file` is
# a regular file the test makes; /proc and /sys hold no files of ours.
UNUSABLE_DIRS = {"a regular file": "file", "a dir below a file": "file/cache",
                 "under /proc": "/proc/layerwarm-cache", "under /sys": "/sys/layerwarm-cache"}
CACHE_CASE_NAMES = [f"{cmd}, {kind}" for cmd in EMBEDDED_COMMANDS for kind in UNUSABLE_DIRS]


@pytest.mark.parametrize("name", CACHE_CASE_NAMES)
def test_unusable_cache_dir_is_one_line(name: str, tmp_path: Path) -> None:
    command, kind = name.split(", ", 1)
    victim = tmp_path / "file"
    victim.write_bytes(b"not a cache\n")
    victim.chmod(0o640)
    cache_dir = tmp_path / UNUSABLE_DIRS[kind]
    case = Case(name, (*EMBEDDED_COMMANDS[command], "--cache-dir", str(cache_dir)), EXIT_USAGE,
                (f"cache directory {cache_dir}", "LAYERWARM_CACHE_DIR"))
    started = time.monotonic()
    done = run_layerwarm(*case.args, cache_dir=tmp_path / "unused", timeout=BOUND)
    check_one_line(done, case, started)
    assert victim.read_bytes() == b"not a cache\n"  # nothing written into it, nor beside it
    assert victim.stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


# ---- 2a. A cache dir this user may not use -----------------------------------------------

READERS = {"ls", "df", "metrics", "verify --report", "inspect", "usage", "pin --list"}
OTHER_UID = 65534  # nobody


def as_another_user(cache_dir: Path, mode: int) -> list[str]:
    """Give `cache_dir` to another user with `mode`; return the command prefix that runs
    `layerwarm` without the power to ignore that (as root: without CAP_DAC_OVERRIDE and
    CAP_DAC_READ_SEARCH, which would let root in anyway)."""
    import os
    import shutil

    cache_dir.mkdir()
    if os.geteuid() != 0:  # not root: the mode alone keeps this user out
        cache_dir.chmod(mode & 0o7)
        return []
    os.chown(cache_dir, OTHER_UID, OTHER_UID)
    cache_dir.chmod(mode)
    setpriv = shutil.which("setpriv")
    assert setpriv, "setpriv (util-linux) is needed to drop root's file-permission override"
    return [setpriv, "--bounding-set=-dac_override,-dac_read_search"]


@pytest.mark.parametrize("command", EMBEDDED_COMMANDS)
@pytest.mark.parametrize("mode", [0o700, 0o755], ids=["no access", "read only to this user"])
def test_a_cache_dir_of_another_user_is_one_line(command: str, mode: int, tmp_path: Path) -> None:
    cache_dir = tmp_path / "theirs"
    prefix = as_another_user(cache_dir, mode)
    args = (*EMBEDDED_COMMANDS[command], "--cache-dir", str(cache_dir))
    started = time.monotonic()
    done = subprocess.run([*prefix, *layerwarm_cmd(*args)], capture_output=True, text=True,
                          timeout=BOUND, stdin=subprocess.DEVNULL,
                          env=layerwarm_env(tmp_path / "unused"))
    if mode == 0o755 and command in READERS:  # it can list the directory: that is enough
        assert "Traceback" not in done.stderr and "permission denied" not in done.stderr, (
            done.stderr)
        assert done.returncode in (0, 1), done.stderr  # 1: inspect/usage of an unknown digest
    else:
        check_one_line(done, Case(command, args, EXIT_USAGE, (
            f"cache directory {cache_dir}: permission denied", "LAYERWARM_CACHE_DIR")), started)
    assert list(cache_dir.iterdir()) == [], "nothing written into it"


# ---- 2b. A read-only cache: the readers work, the writers fail in one line -------------

@pytest.fixture
def read_only_cache(tmp_path: Path, registry: RegistryServer) -> Iterator[tuple[Path, Path, str]]:
    """(the cache, mounted read-only at ro/; its writable source; a layer digest in it)."""
    src, ro = tmp_path / "src", tmp_path / "ro"
    layer = Layer(random_tar(1301, 200_000), "gzip")
    repo = f"errors/{uuid.uuid4().hex[:10]}"
    registry.push_image(repo, "v1", Image([layer]))
    done = run_layerwarm("warm", f"{registry.host}/{repo}:v1", cache_dir=src)
    assert done.returncode == 0, done.stderr
    ro.mkdir()
    for argv in (["mount", "--bind", str(src), str(ro)],
                 ["mount", "-o", "remount,ro,bind", str(ro)]):
        if subprocess.run(argv, capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(ro)], check=False)
            pytest.fail("cannot bind-mount the cache read-only (needs root)")
    try:
        yield ro, src, layer.digest
    finally:
        subprocess.run(["umount", "-l", str(ro)], check=False)


def reader_commands(digest: str) -> dict[str, tuple[str, ...]]:
    return {"ls": ("ls",), "inspect": ("inspect", digest), "usage": ("usage", digest),
            "df": ("df",), "metrics": ("metrics",), "verify --report": ("verify", "--report"),
            "pin --list": ("pin", "--list")}


def writer_commands(digest: str, image: str) -> dict[str, tuple[str, ...]]:
    return {"rm": ("rm", digest), "gc --max-size 0": ("gc", "--max-size", "0"),
            "warm": ("warm", image), "pin": ("pin", "--ttl", "1h", digest)}


def test_read_only_cache_is_read_and_not_written(read_only_cache, registry, tmp_path) -> None:
    ro, src, digest = read_only_cache
    before = {p.name: p.read_bytes() for p in src.iterdir() if p.name.startswith("sha256_")}
    short = digest.removeprefix("sha256:")[:12]
    for name, args in reader_commands(digest).items():
        done = run_layerwarm(*args, "--cache-dir", str(ro), cache_dir=tmp_path / "unused",
                             timeout=BOUND)
        assert done.returncode == 0, f"{name}: {done.stderr}"
        assert "Traceback" not in done.stderr and not done.stderr.strip(), f"{name}: {done.stderr}"
        if name in ("ls", "inspect"):
            assert short in done.stdout, f"{name}: {done.stdout}"
    other = Layer(random_tar(1302, 50_000), "gzip")
    repo = f"errors/{uuid.uuid4().hex[:10]}"
    registry.push_image(repo, "v2", Image([other]))
    for name, args in writer_commands(digest, f"{registry.host}/{repo}:v2").items():
        case = Case(name, (*args, "--cache-dir", str(ro)), EXIT_FAILED,
                    (str(ro), "read-only"))
        started = time.monotonic()
        done = run_layerwarm(*case.args, cache_dir=tmp_path / "unused", timeout=BOUND)
        check_one_line(done, case, started)
    assert {p.name: p.read_bytes() for p in src.iterdir()
            if p.name.startswith("sha256_")} == before
    done = run_layerwarm("verify", cache_dir=src)
    assert done.returncode == 0, done.stderr


# ---- 3. A missing S3 bucket: said once, then warm as if S3 were down -------------------
# (Refused credentials take the same path, Unauthorized from connect, but moto_server
# accepts any key, so no test here can make it refuse them.)

def test_refused_s3_credentials_are_said_once_and_warm_goes_on(registry: RegistryServer,
                                                                tmp_path: Path) -> None:
    layers = [Layer(random_tar(1450 + i, 60_000), "gzip") for i in range(3)]
    repo = f"errors/{uuid.uuid4().hex[:10]}"
    registry.push_image(repo, "1", Image(layers))
    cache_dir = tmp_path / "cache"
    with S3Server(check_credentials=True) as strict:  # the dummy keys are unknown to it
        done = run_layerwarm("warm", "--remote", "s3://layers/x", f"{registry.host}/{repo}:1",
                             cache_dir=cache_dir, env=strict.env(), timeout=BOUND)
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 0, done.stderr  # as for a missing bucket or an unreachable S3
    said = [ln for ln in done.stderr.splitlines() if "s3://layers/x" in ln]
    assert len(said) == 1, done.stderr
    assert "InvalidAccessKeyId" in said[0] and "from the registry" in said[0], said[0]
    assert not [ln for ln in done.stderr.splitlines() if "ERROR" in ln or "error:" in ln]
    assert len([p for p in cache_dir.iterdir() if p.name.startswith("sha256_")]) == 3


def test_missing_bucket_is_said_once_and_the_publishes_wait(registry: RegistryServer, s3,
                                                             tmp_path: Path) -> None:
    bucket = f"gone-{uuid.uuid4().hex[:8]}"
    layers = [Layer(random_tar(1400 + i, 60_000), "gzip") for i in range(3)]
    repo = f"errors/{uuid.uuid4().hex[:10]}"
    registry.push_image(repo, "1", Image(layers))
    cache_dir = tmp_path / "cache"
    warm = ("warm", "--remote", f"s3://{bucket}/x", f"{registry.host}/{repo}:1")
    done = run_layerwarm(*warm, cache_dir=cache_dir, env=s3.env(), timeout=BOUND)
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 0, done.stderr  # as for an unreachable S3 (docs/CACHE.md)
    said = [ln for ln in done.stderr.splitlines() if f"s3://{bucket}/x" in ln]
    assert len(said) == 1, done.stderr
    assert "does not exist" in said[0] and "from the registry" in said[0], said[0]
    assert not [ln for ln in done.stderr.splitlines() if "ERROR" in ln or "error:" in ln]
    assert len([p for p in cache_dir.iterdir() if p.name.startswith("sha256_")]) == 3
    assert run_layerwarm("verify", cache_dir=cache_dir).returncode == 0

    # The bucket made: the next warm is three disk hits that publish what they owed.
    s3.create_bucket(bucket)
    done = run_layerwarm(*warm, cache_dir=cache_dir, env=s3.env(), timeout=BOUND)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("layer published to remote") == 3, done.stderr
    for lay in layers:
        key = "x/sha256_" + lay.digest.removeprefix("sha256:")
        assert s3.client().get_object(Bucket=bucket, Key=key)["Body"].read() == lay.tar
