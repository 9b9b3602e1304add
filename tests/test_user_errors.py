"""The mistakes a newcomer makes most, each answered in one line with the README's exit code.

Table-driven: every case runs the real `layerwarm` command in a subprocess and checks what
a user sees: the exit code (2 usage, 1 failure), exactly one `layerwarm:`/`error:` line
naming the problem and what to do, no `Traceback` anywhere, and an end within a bound.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.cli import run_layerwarm

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
