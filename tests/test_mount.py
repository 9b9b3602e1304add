"""`layerwarm mount`: a real FUSE mount of an image's merged view (tests run as root, with
/dev/fuse and Debian's fuse3), walked file by file, a program run from it with chroot, and
reads of a layer that is only in the remote tier (its index and the ranges read).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.support.cli import layerwarm_cmd, layerwarm_env, run_layerwarm
from tests.support.images import Image, Layer
from tests.support.registry import RegistryServer
from tests.support.shell import shell_layer
from tests.support.tars import Dir, File, Hardlink, Symlink, Whiteout, make_tar

MOUNT_WAIT = 60.0


@pytest.fixture(scope="module")
def image(registry: RegistryServer) -> str:
    top = Layer(make_tar([
        Dir("etc"), File("etc/motd", b"hello from a layerwarm mount\n"),
        Symlink("etc/greeting", "motd"), Hardlink("etc/motd2", "etc/motd"),
        Whiteout("bin/nothing"),
    ]), "zstd")
    repo = f"mount/{uuid.uuid4().hex[:10]}"
    registry.push_image(repo, "1", Image([shell_layer(), top]))
    return f"{registry.host}/{repo}:1"


@contextmanager
def mounted(image: str, mountpoint: Path, cache_dir: Path,
            env: dict[str, str] | None = None) -> Iterator[subprocess.Popen]:
    mountpoint.mkdir(exist_ok=True)
    proc = subprocess.Popen(layerwarm_cmd("mount", image, str(mountpoint), "--foreground"),
                            env=layerwarm_env(cache_dir, env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + MOUNT_WAIT
        while not os.path.ismount(mountpoint):
            if proc.poll() is not None:
                pytest.fail(f"mount exited {proc.returncode}: {proc.stderr.read().decode()}")
            assert time.monotonic() < deadline, "not mounted within a minute"
            time.sleep(0.1)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)])
                proc.kill()


def test_a_mount_is_the_image_and_a_program_runs_from_it(image: str, cache_dir: Path,
                                                          tmp_path: Path) -> None:
    assert run_layerwarm("warm", image, cache_dir=cache_dir).returncode == 0
    tree = tmp_path / "exported"
    done = run_layerwarm("export", image, "--dir", str(tree), cache_dir=cache_dir)
    assert done.returncode == 0, done.stderr
    mp = tmp_path / "mnt"
    with mounted(image, mp, cache_dir) as proc:
        seen = _walk(mp)
        assert seen == _walk(tree), "the mount differs from the exported tree"
        assert os.stat(mp / "etc/motd").st_ino == os.stat(mp / "etc/motd2").st_ino
        assert os.stat(mp / "etc/motd").st_nlink == 2
        with pytest.raises(OSError):
            (mp / "etc/new").write_text("no")  # read-only
        run = subprocess.run(["chroot", str(mp), "/bin/sh", "-c",
                              "read line < /etc/greeting; echo \"$line\"; echo ok"],
                             capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stderr
        assert run.stdout == "hello from a layerwarm mount\nok\n"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, proc.stderr.read().decode()
    assert not os.path.ismount(mp), "SIGTERM unmounts"


def _walk(root: Path) -> dict[str, tuple]:
    """Per path below `root`: type and permission bits, owner, size, link target, content."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = os.lstat(p)
            rel = str(p.relative_to(root))
            link = os.readlink(p) if os.path.islink(p) else None
            data = p.read_bytes() if p.is_file() and not p.is_symlink() else None
            out[rel] = (st.st_mode, st.st_uid, st.st_gid,
                        st.st_size if data is not None else None, link, data)
    return out


def test_mount_of_a_layer_only_in_the_remote_tier_reads_only_what_is_touched(
    image: str, tmp_path: Path
) -> None:
    shared = tmp_path / "shared"
    done = run_layerwarm("warm", image, "--remote", shared.as_uri(),
                         cache_dir=tmp_path / "warmer")
    assert done.returncode == 0, done.stderr
    reader = tmp_path / "reader"
    mp = tmp_path / "mnt"
    with mounted(image, mp, reader, {"LAYERWARM_REMOTE": shared.as_uri()}):
        assert (mp / "etc/greeting").read_bytes() == b"hello from a layerwarm mount\n"
    assert not list(reader.glob("sha256_*")), "no layer was fetched whole"


def test_mount_without_fuse_is_one_line(image: str, cache_dir: Path, tmp_path: Path) -> None:
    """In a mount namespace whose /dev is an empty tmpfs: a machine without /dev/fuse."""
    script = ('mount -t tmpfs none /dev && exec "$@"')
    cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
           *layerwarm_cmd("mount", image, str(tmp_path), "--foreground")]
    done = subprocess.run(cmd, env=layerwarm_env(cache_dir), capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines() == [
        "layerwarm: mount: this machine has no /dev/fuse (load the fuse module, or give "
        "the container --device /dev/fuse)"], done.stderr
