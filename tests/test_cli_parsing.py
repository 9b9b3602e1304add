"""How `layerwarm` reads its command line: options anywhere among a command's operands."""

from __future__ import annotations

import argparse
import contextlib
import io
import os
from pathlib import Path

import pytest

from pipeline.config import Settings
from workers.cli import build_parser
from workers.cli.worker import _celery_commands


def _commands() -> list[str]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sorted(sub.choices)


@pytest.mark.parametrize("command", _commands())
def test_every_command_parses_its_help(command: str) -> None:
    # Intermixed parsing refuses some parser shapes (a positional in an exclusive group)
    # only when it parses: each command is parsed once here.
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as stop:
        build_parser().parse_args([command, "--help"])
    assert stop.value.code == 0
    assert f"usage: layerwarm {command}" in out.getvalue()


@pytest.mark.parametrize(("argv", "want"), [
    (["files", "img", "-R", "/etc"], {"image": "img", "path": "/etc", "recursive": True}),
    (["files", "-R", "img"], {"image": "img", "path": "/", "recursive": True}),
    (["cat", "img", "/a", "--platform", "linux/arm64", "/b"],
     {"image": "img", "paths": ["/a", "/b"], "platform": "linux/arm64"}),
    (["warm", "a", "-v", "b"], {"refs": ["a", "b"], "verbose": True}),
    (["submit", "a", "--to", "remote", "b"], {"refs": ["a", "b"], "to": "remote"}),
])
def test_options_go_before_between_or_after_operands(argv: list[str], want: dict) -> None:
    got = vars(build_parser().parse_args(argv))
    assert {k: got[k] for k in want} == want


def test_an_operand_too_many_is_still_refused() -> None:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as stop:
        build_parser().parse_args(["files", "img", "/etc", "-R", "/bin"])
    assert stop.value.code == 2
    assert "unrecognized arguments: /bin" in err.getvalue()


@pytest.mark.parametrize(("flags", "env", "io", "cpu"), [
    ([], {}, "16", str(os.cpu_count() or 2)),
    ([], {"LAYERWARM_IO_THREADS": "5", "LAYERWARM_CPU_THREADS": "3"}, "5", "3"),
    (["--io-concurrency", "7"], {"LAYERWARM_IO_THREADS": "5"}, "7", str(os.cpu_count() or 2)),
])
def test_a_workers_pools_take_the_flags_then_the_settings(
        flags: list[str], env: dict[str, str], io: str, cpu: str, tmp_path: Path) -> None:
    args = build_parser().parse_args(["worker", "--node", "n1", *flags])
    settings = Settings.from_env({"LAYERWARM_CACHE_DIR": str(tmp_path), **env})
    commands = _celery_commands(args, "n1", settings)

    def concurrency(argv: list[str]) -> str:
        return argv[argv.index("-c") + 1]

    assert concurrency(commands["io@n1"]) == io
    assert concurrency(commands["cpu@n1"]) == cpu
