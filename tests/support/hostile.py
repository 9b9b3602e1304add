"""Run `layerwarm` on hostile input inside a sandbox, and check what every such run must keep.

A `Sandbox` is one test's tmp_path laid out as a small world: the cache dir (not created:
layerwarm makes it when it needs it), and HOME, XDG_CACHE_HOME, TMPDIR and the working
directory pointed at their own empty directories. Everything under tmp_path except the
cache is snapshotted before and after a run, so a file written anywhere a hostile name
could lead (a default cache, a temp file, a relative path from the cwd) is caught.

`check_failure` is the one place the corpus's invariants live:

- the expected exit code, in bounded time, never a traceback;
- every stderr line is either a log line or one `error:` / `layerwarm:` line, and each of
  those matches the expected pattern (a message with a newline shows up as a stray line);
- no raw control characters reach the terminal (hostile strings are escaped);
- nothing cached for the hostile layer(s), no `.tmp` / `.staging` leftovers, and every
  name in the cache is a well-formed digest name;
- nothing changed outside the cache, and none of the `watch` paths exists.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.cli import entries, layerwarm_cmd, layerwarm_env, leftovers

LOG_LINE = re.compile(
    r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (?:DEBUG|INFO|WARNING|ERROR|CRITICAL) \S"
)
ERROR_LINE = re.compile(r"(?:error|layerwarm): ")
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
CACHE_NAME = r"(?:sha256_[0-9a-f]{64}|sha512_[0-9a-f]{128})"
_NAMES_IN = {
    ".": re.compile(rf"{CACHE_NAME}|\.staging|\.tmp|\.locks|\.index|"
                    r"\.meta\.db(?:\.corrupt-\d{8}T\d{6}Z(?:-\d+)?)?(?:-wal|-shm|-journal)?"),
    ".staging": re.compile(rf"{CACHE_NAME}(?:\.partial)?"),
    ".tmp": re.compile(rf"{CACHE_NAME}\..+"),
    ".index": re.compile(CACHE_NAME),  # each entry's file index (pipeline/fileindex.py)
    # content_: per diff_id; meta.db.lock: held while repairing .meta.db
    ".locks": re.compile(rf"(?:content_)?{CACHE_NAME}\.lock|meta\.db\.lock"),
}
DEFAULT_TIMEOUT = 60.0


@dataclass
class Run:
    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    def show(self) -> str:
        lines = self.stderr.splitlines()
        if len(lines) > 16:
            lines = [*lines[:6], f"... ({len(lines) - 14} lines) ...", *lines[-8:]]
        shown = "\n".join(line[:500] for line in lines)
        return (f"layerwarm {' '.join(repr(a) for a in self.args)[:300]}\n"
                f"exit {self.returncode} after {self.seconds:.1f}s; stderr:\n{shown}")


def _digest_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


class Sandbox:
    """tmp_path as a world of its own for one layerwarm run (see the module docstring)."""

    def __init__(self, tmp_path: Path) -> None:
        self.root = tmp_path
        self.cache = tmp_path / "cache"
        self.home = tmp_path / "home"
        self.xdg_cache = tmp_path / "xdg-cache"
        self.tmpdir = tmp_path / "tmp"
        self.cwd = tmp_path / "cwd"
        for d in (self.home, self.xdg_cache, self.tmpdir, self.cwd):
            d.mkdir(exist_ok=True)

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        env = layerwarm_env(self.cache, {
            "HOME": str(self.home),
            "XDG_CACHE_HOME": str(self.xdg_cache),
            "TMPDIR": str(self.tmpdir),
        })  # fmt: skip
        env.update(extra or {})
        return env

    def snapshot(self) -> dict[str, str]:
        """Every path under root but the cache: file content digest, link target, or dir."""
        out: dict[str, str] = {}
        for dirpath, dirnames, filenames in os.walk(self.root, followlinks=False):
            here = Path(dirpath)
            if here == self.root and "cache" in dirnames:
                dirnames.remove("cache")
            for name in dirnames + filenames:
                p = here / name
                rel = str(p.relative_to(self.root))
                if p.is_symlink():
                    out[rel] = "link:" + os.readlink(p)
                elif p.is_dir():
                    out[rel] = "dir"
                else:
                    out[rel] = _digest_file(p)
        return out

    def run(
        self, *args: str, env: Mapping[str, str] | None = None, timeout: float = DEFAULT_TIMEOUT,
    ) -> tuple[Run, dict[str, str]]:
        """Run the real CLI; returns the run and the outside-the-cache snapshot taken before."""
        before = self.snapshot()
        started = time.monotonic()
        try:
            p = subprocess.run(
                layerwarm_cmd(*args), env=self.env(env), cwd=self.cwd, capture_output=True,
                stdin=subprocess.DEVNULL, timeout=timeout,
            )
        except subprocess.TimeoutExpired as e:
            hung = (e.stderr or b"").decode(errors="replace").splitlines()[-10:]
        else:
            hung = None
        if hung is not None:
            pytest.fail(
                f"layerwarm did not finish within {timeout:.0f}s (a hang): "
                f"{' '.join(repr(a) for a in args)[:300]}\nstderr so far:\n" + "\n".join(hung),
                pytrace=False,
            )
        run = Run(
            tuple(args), p.returncode, p.stdout.decode(errors="replace"),
            p.stderr.decode(errors="replace"), time.monotonic() - started,
        )
        return run, before


def escape_targets(sandbox: Sandbox, rel: str) -> list[Path]:
    """Where a hostile relative name (`../../x`) would land if it became a path, from every
    directory layerwarm writes in or runs from, bare and as a cache, staging or lock name."""
    bases = [sandbox.cache, sandbox.cache / ".staging", sandbox.cache / ".tmp",
             sandbox.cache / ".locks", sandbox.cwd, sandbox.root]
    names = [rel, f"sha256_{rel}", f"sha256_{rel}.lock", f"sha256_{rel}.partial"]
    return [Path(os.path.normpath(b / n)) for b in bases for n in names]


def check_cache_names(cache: Path) -> None:
    """Every name layerwarm made in the cache is a well-formed digest name (or its layout)."""
    if not cache.exists():
        return
    for sub, pattern in _NAMES_IN.items():
        d = cache / sub
        if not d.is_dir():
            continue
        for p in d.iterdir():
            assert pattern.fullmatch(p.name), f"unexpected name in the cache: {sub}/{p.name!r}"


def check_stderr_lines(run: Run, expect: str | None) -> list[str]:
    """Every stderr line is a log line or a one-line error matching `expect`; returns the
    error lines."""
    assert "Traceback" not in run.stderr, f"traceback on stderr:\n{run.show()}"
    assert not CONTROL.search(run.stderr), (
        f"raw control character on stderr: {CONTROL.search(run.stderr)!r}\n{run.show()}")
    errors = []
    for line in run.stderr.splitlines():
        if ERROR_LINE.match(line):
            errors.append(line)
        elif not LOG_LINE.match(line):
            pytest.fail(f"stray stderr line (a multi-line message?): {line[:300]!r}\n"
                        f"{run.show()}", pytrace=False)
    if expect is not None:
        for line in errors:
            assert re.search(expect, line), (
                f"error line does not say {expect!r}: {line[:400]!r}\n{run.show()}")
    return errors


def check_outside(sandbox: Sandbox, before: dict[str, str], watch: Iterable[Path] = ()) -> None:
    after = sandbox.snapshot()
    added = sorted(set(after) - set(before))
    changed = sorted(k for k in before if k in after and before[k] != after[k])
    removed = sorted(set(before) - set(after))
    assert not (added or changed or removed), (
        f"files changed outside the cache: added {added}, changed {changed}, removed {removed}")
    for path in watch:
        assert not os.path.lexists(path), f"a hostile name escaped the cache: {path} exists"


def check_failure(
    sandbox: Sandbox,
    run: Run,
    before: dict[str, str],
    *,
    code: int,
    expect: str,
    hostile: Iterable[str] = (),
    allowed: Iterable[str] = (),
    watch: Iterable[Path] = (),
) -> list[str]:
    """The invariants of a run that must fail: see the module docstring.

    `hostile` are layer digests (`sha256:…`) that must not be cached; `allowed` are the
    only cache entry names that may exist (other, honest layers of the same run).
    """
    assert run.returncode == code, f"expected exit {code}\n{run.show()}"
    errors = check_stderr_lines(run, expect)
    assert errors, f"no error line on stderr (want one matching {expect!r})\n{run.show()}"
    if code == 2:
        assert len(run.stderr.splitlines()) == 1, f"a usage error is one line\n{run.show()}"
    cached = entries(sandbox.cache)
    for digest in hostile:
        name = "sha256_" + digest.removeprefix("sha256:")
        assert name not in cached, f"hostile layer {digest} was cached"
    assert cached <= set(allowed), f"unexpected cache entries {sorted(cached - set(allowed))}"
    assert leftovers(sandbox.cache) == [], f"leftovers: {leftovers(sandbox.cache)}"
    check_cache_names(sandbox.cache)
    check_outside(sandbox, before, watch)
    return errors


def check_success(
    sandbox: Sandbox, run: Run, before: dict[str, str], *, watch: Iterable[Path] = (),
) -> None:
    """A run that must succeed: exit 0, clean stderr, nothing outside the cache."""
    assert run.returncode == 0, f"expected exit 0\n{run.show()}"
    errors = check_stderr_lines(run, None)
    assert not errors, f"error lines on a successful run\n{run.show()}"
    assert leftovers(sandbox.cache) == [], f"leftovers: {leftovers(sandbox.cache)}"
    check_cache_names(sandbox.cache)
    check_outside(sandbox, before, watch)
