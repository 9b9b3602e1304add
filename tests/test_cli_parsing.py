"""How `layerwarm` reads its command line: options anywhere among a command's operands."""

from __future__ import annotations

import argparse
import contextlib
import io

import pytest

from workers.cli import build_parser


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
