"""A layer that holds a shell: the host's /bin/dash as /bin/sh and the libraries `ldd`
lists for it, enough for `chroot ROOT /bin/sh -c ...` (the mount tests, bench 15)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.support.images import Layer
from tests.support.tars import Dir, Entry, File, make_tar


def host_file(path: str) -> File:
    """The host's file at `path` (links followed), with its permission bits."""
    real = os.path.realpath(path)
    return File(path.lstrip("/"), Path(real).read_bytes(), os.stat(real).st_mode & 0o7777)


def shell_layer() -> Layer:
    libs = subprocess.run(["ldd", "/bin/dash"], capture_output=True, text=True, check=True)
    paths = [p for line in libs.stdout.splitlines() for p in line.split()
             if p.startswith("/") and os.path.exists(p)]
    entries: list[Entry] = [Dir("bin")]
    made = {"bin"}
    for p in paths:
        parts = p.lstrip("/").split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in made:
                made.add(d)
                entries.append(Dir(d))
        entries.append(host_file(p))
    entries.append(File("bin/sh", Path("/bin/dash").read_bytes(), 0o755))
    return Layer(make_tar(entries), "gzip")
