"""How `layerwarm` reads its command line: options anywhere among a command's operands."""

from __future__ import annotations

import argparse
import contextlib
import io
import os
from pathlib import Path

import pytest

from pipeline.cli import command_of
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
        build_parser(command).parse_args([command, "--help"])
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


@pytest.mark.parametrize("argv", [
    ["files", "img", "-R", "/etc"], ["warm", "a", "-v", "--json", "-f", "list", "b"],
    ["submit", "a", "--to", "remote", "--broker", "redis://h:1/0"], ["gc", "--max-size", "1G"],
    ["worker", "--node", "n1", "--io-concurrency", "3"], ["cat", "img", "/a", "/b"],
])
def test_a_command_line_built_for_its_command_reads_as_the_whole_one(argv: list[str]) -> None:
    # `layerwarm` builds only the options of the command it runs (command_of)
    assert command_of(argv) == argv[0]
    assert vars(build_parser(argv[0]).parse_args(argv)) == vars(build_parser().parse_args(argv))


def test_the_other_commands_are_still_listed() -> None:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        build_parser("warm").parse_args(["--help"])
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as stop:
        build_parser("wram").parse_args(["wram", "x"])
    assert stop.value.code == 2
    for command in _commands():
        assert command in out.getvalue()
        assert repr(command) in err.getvalue()  # invalid choice: 'wram' (choose from ...)
    # ... while their options were never built
    sub = next(a for a in build_parser("warm")._actions
               if isinstance(a, argparse._SubParsersAction))
    assert isinstance(sub.choices["warm"], argparse.ArgumentParser)
    assert not isinstance(sub.choices["files"], argparse.ArgumentParser)


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
