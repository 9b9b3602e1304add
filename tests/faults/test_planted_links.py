"""Links planted in the disk cache (issue 12): nothing is written, created or read through them.

Someone with write access to the cache directory (another user of a shared cache, a
careless script) plants a symlink where layerwarm keeps its own files: a download's
`.partial`, a staged blob, a lock file, an entry, one of the cache's subdirectories. Each
test runs the real CLI against the real registry and checks what a user would: the file
outside the cache (the victim) keeps its bytes and mode, a dangling link's target is never
created, the run prints one clear line about the link and then does its job (or fails
with one line when it cannot), no traceback, and `layerwarm verify` is clean afterwards.
A read-only `.locks` directory is the same kind of environment fault: one line, exit 1.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.cli import entries, layerwarm_cmd, layerwarm_env, leftovers, run_layerwarm
from tests.support.hostile import ERROR_LINE, LOG_LINE
from tests.support.images import Image, Layer, random_tar
from tests.support.mounts import tmpfs
from tests.support.proxy import Proxy
from tests.support.registry import RegistryServer

HELD = 1 << 20  # bytes of a blob the proxy holds back while a test looks at the cache


def _name(lay: Layer) -> str:
    return "sha256_" + lay.digest.removeprefix("sha256:")


def _diff_name(lay: Layer) -> str:
    return "sha256_" + lay.diff_id.removeprefix("sha256:")


def _push(registry: RegistryServer, proxy: Proxy, *layers: Layer) -> str:
    repo = f"links/{uuid.uuid4().hex[:10]}"
    registry.push_image(repo, "1", Image(list(layers)))
    return f"{proxy.host}/{repo}:1"


@dataclass
class Victim:
    """A file outside the cache that a planted link points at; it must never change."""

    path: Path
    data: bytes
    mode: int

    @classmethod
    def make(cls, where: Path, data: bytes, mode: int = 0o640) -> Victim:
        where.parent.mkdir(parents=True, exist_ok=True)
        where.write_bytes(data)
        os.chmod(where, mode)
        return cls(where, data, mode)

    def assert_intact(self) -> None:
        st = os.lstat(self.path)
        assert stat.S_ISREG(st.st_mode), f"{self.path} is no longer a regular file"
        assert stat.S_IMODE(st.st_mode) == self.mode, \
            f"{self.path} mode {oct(stat.S_IMODE(st.st_mode))}, was {oct(self.mode)}"
        assert self.path.read_bytes() == self.data, f"{self.path} was written through a link"


def _no_traceback(stderr: str) -> list[str]:
    """Every stderr line is a log line or an `error:`/`layerwarm:` line; the warnings."""
    assert "Traceback" not in stderr, stderr
    for line in stderr.splitlines():
        assert LOG_LINE.match(line) or ERROR_LINE.match(line), \
            f"stray stderr line: {line!r}\n{stderr}"
    return [x for x in stderr.splitlines() if " WARNING " in x]


def _one_warning_naming(stderr: str, path: Path) -> None:
    warnings = [w for w in _no_traceback(stderr) if str(path) in w]
    assert len(warnings) == 1, f"want one warning naming {path}:\n{stderr}"
    assert "is not a regular file but" in warnings[0], warnings[0]


def _verify_clean(cache_dir: Path) -> None:
    p = run_layerwarm("verify", cache_dir=cache_dir)
    assert p.returncode == 0, (p.stdout, p.stderr)
    assert not re.search(r"^(bad|missing)", p.stdout, re.M), p.stdout
    _no_traceback(p.stderr)


def _warm_ok(ref: str, cache_dir: Path) -> str:
    p = run_layerwarm("warm", ref, cache_dir=cache_dir)
    assert p.returncode == 0, p.stderr
    return p.stderr


# ------------------------------------------------------------------- staging and partials


@pytest.mark.parametrize("target", ["blob-prefix", "dangling"])
def test_a_partial_that_is_a_link_is_removed_not_written_through(
    registry: RegistryServer, registry_proxy: Proxy, cache_dir: Path, tmp_path: Path,
    target: str,
) -> None:
    """A resumable download's `.partial` planted as a link: to a file holding the blob's
    first half (a resume would append to it), or to nowhere (an open would create it)."""
    lay = Layer(random_tar(1200, 600_000), "none")
    ref = _push(registry, registry_proxy, lay)
    partial = cache_dir / ".staging" / (_name(lay) + ".partial")
    partial.parent.mkdir()
    outside = tmp_path / "outside" / "victim"
    victim = None
    if target == "blob-prefix":
        victim = Victim.make(outside, lay.blob[: lay.size // 2])
    partial.symlink_to(outside)

    stderr = _warm_ok(ref, cache_dir)
    _one_warning_naming(stderr, partial)
    if victim is not None:
        victim.assert_intact()
    else:
        assert not os.path.lexists(outside), "a dangling link's target was created"
    assert registry_proxy.count("GET", f"/blobs/{lay.digest}") == 1
    assert (cache_dir / _name(lay)).read_bytes() == lay.tar
    assert leftovers(cache_dir) == []
    _verify_clean(cache_dir)


def test_a_staged_blob_that_is_a_link_is_removed_and_fetched(
    registry: RegistryServer, registry_proxy: Proxy, cache_dir: Path, tmp_path: Path,
) -> None:
    """`.staging/sha256_<hex>` planted as a link to a file with the blob's very bytes: it is
    neither hashed, decompressed nor removed through; the blob is fetched."""
    lay = Layer(random_tar(1201, 300_000), "gzip")
    ref = _push(registry, registry_proxy, lay)
    staged = cache_dir / ".staging" / _name(lay)
    staged.parent.mkdir()
    victim = Victim.make(tmp_path / "outside" / "blob", lay.blob, 0o600)
    staged.symlink_to(victim.path)

    stderr = _warm_ok(ref, cache_dir)
    _one_warning_naming(stderr, staged)
    victim.assert_intact()
    assert registry_proxy.count("GET", f"/blobs/{lay.digest}") == 1
    assert (cache_dir / _name(lay)).read_bytes() == lay.tar
    assert leftovers(cache_dir) == []
    _verify_clean(cache_dir)


# ------------------------------------------------------------------------------ locks


@pytest.mark.parametrize("which", ["digest", "content"])
def test_a_dangling_lock_link_does_not_create_its_target(
    registry: RegistryServer, registry_proxy: Proxy, cache_dir: Path, tmp_path: Path,
    which: str,
) -> None:
    """`.locks/sha256_<hex>.lock` (or the diff_id's `content_` lock) planted as a link to a
    file that does not exist: taking the lock must not create it."""
    lay = Layer(random_tar(1202, 200_000), "gzip")
    ref = _push(registry, registry_proxy, lay)
    locks = cache_dir / ".locks"
    locks.mkdir()
    name = f"{_name(lay)}.lock" if which == "digest" else f"content_{_diff_name(lay)}.lock"
    outside = tmp_path / "outside" / "created-by-a-lock"
    outside.parent.mkdir()
    (locks / name).symlink_to(outside)

    stderr = _warm_ok(ref, cache_dir)
    assert not os.path.lexists(outside), "a lock link's target was created"
    assert os.listdir(outside.parent) == []
    _one_warning_naming(stderr, locks / name)
    assert (cache_dir / _name(lay)).read_bytes() == lay.tar
    assert stat.S_ISREG(os.lstat(locks / name).st_mode), "the lock is a file of the cache's own"
    _verify_clean(cache_dir)


@pytest.fixture
def read_only_locks(cache_dir: Path) -> Iterator[Path]:
    """`.locks` as a read-only mount: even root cannot create a lock file there (EROFS)."""
    with tmpfs(cache_dir / ".locks", "ro,size=64k", "a read-only .locks") as locks:
        yield locks


@pytest.mark.parametrize("command", [("verify",), ("gc", "--max-size", "0")])
def test_a_read_only_locks_directory_is_one_clear_line(
    registry: RegistryServer, registry_proxy: Proxy, cache_dir: Path, command: tuple[str, ...],
    request: pytest.FixtureRequest,
) -> None:
    lay = Layer(random_tar(1203, 200_000), "gzip")
    _warm_ok(_push(registry, registry_proxy, lay), cache_dir)
    before = (cache_dir / _name(lay)).read_bytes()
    locks = request.getfixturevalue("read_only_locks")

    p = run_layerwarm(*command, cache_dir=cache_dir)
    assert p.returncode == 1, (p.stdout, p.stderr)
    _no_traceback(p.stderr)
    errors = [x for x in p.stderr.splitlines() if x.startswith("layerwarm: ")]
    assert len(errors) == 1, p.stderr
    assert str(locks) in errors[0] and "writable" in errors[0], errors[0]
    assert (cache_dir / _name(lay)).read_bytes() == before, "nothing was removed unlocked"


# ---------------------------------------------------------------------------- entries


def test_an_entry_replaced_by_a_link_is_not_a_hit(
    registry: RegistryServer, registry_proxy: Proxy, cache_dir: Path, tmp_path: Path,
) -> None:
    """A warmed entry swapped for a link to an outside file of the same size: the row's
    size matches, but a link is not an entry. It is removed (never its target) and the
    layer fetched again."""
    lay = Layer(random_tar(1204, 300_000), "gzip")
    ref = _push(registry, registry_proxy, lay)
    _warm_ok(ref, cache_dir)
    entry = cache_dir / _name(lay)
    victim = Victim.make(tmp_path / "outside" / "same-size", bytes(len(lay.tar)), 0o600)
    entry.unlink()
    entry.symlink_to(victim.path)
    registry_proxy.reset()

    stderr = _warm_ok(ref, cache_dir)
    _one_warning_naming(stderr, entry)
    victim.assert_intact()
    assert registry_proxy.count("GET", f"/blobs/{lay.digest}") == 1, "a link was a disk hit"
    assert stat.S_ISREG(os.lstat(entry).st_mode) and entry.read_bytes() == lay.tar
    _verify_clean(cache_dir)


def test_a_link_with_the_right_content_is_not_adopted(
    registry: RegistryServer, registry_proxy: Proxy, cache_dir: Path, tmp_path: Path,
) -> None:
    """An entry name with no row, linked to an outside file holding the very tar: adopting
    it would make the next change of that file a "disk hit". It is dropped and fetched."""
    lay = Layer(random_tar(1205, 300_000), "gzip")
    ref = _push(registry, registry_proxy, lay)
    victim = Victim.make(tmp_path / "outside" / "tar", lay.tar, 0o644)
    entry = cache_dir / _name(lay)
    entry.symlink_to(victim.path)

    stderr = _warm_ok(ref, cache_dir)
    _one_warning_naming(stderr, entry)
    victim.assert_intact()
    assert registry_proxy.count("GET", f"/blobs/{lay.digest}") == 1
    assert stat.S_ISREG(os.lstat(entry).st_mode)
    # The outside file changes (same size): the entry is still the cache's own, good copy.
    victim.path.write_bytes(bytes(len(lay.tar)))
    registry_proxy.reset()
    p = run_layerwarm("warm", ref, cache_dir=cache_dir)
    assert p.returncode == 0 and entry.read_bytes() == lay.tar, p.stderr
    _verify_clean(cache_dir)


def test_a_fifo_named_like_an_entry_does_not_hang_a_warm(
    registry: RegistryServer, registry_proxy: Proxy, cache_dir: Path,
) -> None:
    """Opening a FIFO to hash it would wait forever for a writer."""
    lay = Layer(random_tar(1206, 100_000), "gzip")
    ref = _push(registry, registry_proxy, lay)
    entry = cache_dir / _name(lay)
    os.mkfifo(entry)

    p = run_layerwarm("warm", ref, cache_dir=cache_dir, timeout=30)  # hung: TimeoutExpired
    assert p.returncode == 0, p.stderr
    _one_warning_naming(p.stderr, entry)
    assert stat.S_ISREG(os.lstat(entry).st_mode) and entry.read_bytes() == lay.tar
    _verify_clean(cache_dir)


def test_verify_reports_and_removes_a_link_entry_never_its_target(
    registry: RegistryServer, registry_proxy: Proxy, cache_dir: Path, tmp_path: Path,
) -> None:
    lay = Layer(random_tar(1207, 200_000), "gzip")
    ref = _push(registry, registry_proxy, lay)
    _warm_ok(ref, cache_dir)
    entry = cache_dir / _name(lay)
    victim = Victim.make(tmp_path / "outside" / "tar", lay.tar, 0o600)
    entry.unlink()
    entry.symlink_to(victim.path)

    p = run_layerwarm("verify", "--report", cache_dir=cache_dir)
    assert p.returncode == 1, (p.stdout, p.stderr)
    _no_traceback(p.stderr)
    bad = [x for x in p.stdout.splitlines() if x.startswith("bad")]
    assert len(bad) == 1 and lay.digest in bad[0] and "not a regular file" in bad[0], p.stdout
    assert os.path.islink(entry), "--report removes nothing"

    p = run_layerwarm("verify", cache_dir=cache_dir)
    assert p.returncode == 1 and "(removed)" in p.stdout, (p.stdout, p.stderr)
    _no_traceback(p.stderr)
    assert not os.path.lexists(entry)
    victim.assert_intact()
    _verify_clean(cache_dir)
    _warm_ok(ref, cache_dir)
    assert entry.read_bytes() == lay.tar


# ------------------------------------------------------------- the cache's own directories


@pytest.mark.parametrize("sub", [".tmp", ".staging", ".locks"])
def test_a_cache_subdirectory_that_is_a_link_is_refused(
    registry: RegistryServer, registry_proxy: Proxy, cache_dir: Path, tmp_path: Path, sub: str,
) -> None:
    """`.tmp`, `.staging` or `.locks` swapped for a link to another directory: nothing is
    written there; the warm fails with one line naming the link and what to do."""
    lay = Layer(random_tar(1208, 200_000), "gzip")
    ref = _push(registry, registry_proxy, lay)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (cache_dir / sub).symlink_to(elsewhere, target_is_directory=True)

    p = run_layerwarm("warm", ref, cache_dir=cache_dir)
    assert p.returncode == 1, p.stderr
    _no_traceback(p.stderr)
    named = [x for x in p.stderr.splitlines() if str(cache_dir / sub) in x]
    assert named and all("not a directory" in x and "remove it" in x for x in named), p.stderr
    assert os.listdir(elsewhere) == [], "written through a link to another directory"
    assert entries(cache_dir) == set()

    (cache_dir / sub).unlink()  # what the line says to do
    _warm_ok(ref, cache_dir)
    assert (cache_dir / _name(lay)).read_bytes() == lay.tar
    _verify_clean(cache_dir)


# ------------------------------------------------------------------------------- modes


def test_temp_files_are_private_until_the_verified_entry_is_named(
    registry: RegistryServer, registry_proxy: Proxy, cache_dir: Path,
) -> None:
    """While a layer is fetched and decompressed its unverified bytes are 0600; the entry
    named from them is 0644 (other users read entries)."""
    lay = Layer(random_tar(1209, 3_000_000), "none")  # incompressible: the hold is mid-blob
    ref = _push(registry, registry_proxy, lay)
    hold = registry_proxy.hold(f"/blobs/{lay.digest}", HELD)
    warm = subprocess.Popen(layerwarm_cmd("warm", ref), env=layerwarm_env(cache_dir),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        hold.wait(timeout=60)
        # The blob's tail is held, so both stages stay mid-way: the download's partial file
        # exists, and the decompression following it makes its temp file and then waits.
        deadline = time.monotonic() + 60
        while True:
            files = [cache_dir / ".tmp" / n for n in os.listdir(cache_dir / ".tmp")]
            files += [cache_dir / ".staging" / n for n in os.listdir(cache_dir / ".staging")]
            if len(files) == 2 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert len(files) == 2, files
        modes = {p.name: oct(stat.S_IMODE(os.lstat(p).st_mode)) for p in files}
        hold.release()
        _, err = warm.communicate(timeout=120)
    finally:
        hold.release()
        if warm.poll() is None:
            warm.kill()
            warm.wait()
    assert warm.returncode == 0, err
    assert set(modes.values()) == {"0o600"}, modes
    entry = cache_dir / _name(lay)
    assert stat.S_IMODE(os.lstat(entry).st_mode) == 0o644
    assert entry.read_bytes() == lay.tar
