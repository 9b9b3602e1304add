"""A `.meta.db` that cannot be used, and the metadata it keeps bounded (issue 12, items 4, 2).

A database that does not open (random bytes, truncated, a directory, a symlink) is moved
aside by the commands that write (warm, gc, verify, rm) and rebuilt from the entries on
disk; the commands that only read (ls, df, metrics, inspect, usage) list what the
directory holds with one warning and change nothing. Image configs above a size cap are
not stored, the rest are counted by `df` and collected by `gc`.

Everything is real: the registry (behind the counting proxy), SQLite, files, flock(2)
held by this process while the `layerwarm` subprocesses wait for it. Assertions are what
a user checks: exit codes, the one warning line, bytes and modes on disk, `verify` clean,
and a second warm that asks the registry for nothing.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import queue
import re
import shutil
import sqlite3
import subprocess
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.cli import entries, layerwarm_cmd, layerwarm_env, run_layerwarm
from tests.support.images import Image, Layer, canonical_json, random_tar
from tests.support.proxy import Proxy
from tests.support.registry import RegistryServer

WARNING = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} WARNING ")
TIMEOUT = 60.0  # "does not hang": every run here takes a few seconds


@dataclass
class Warmed:
    ref: str
    layers: list[Layer]

    @property
    def names(self) -> set[str]:
        return {_name(x) for x in self.layers}


def _name(lay: Layer) -> str:
    return "sha256_" + lay.digest.removeprefix("sha256:")


def _warmed(registry: RegistryServer, host: str, cache_dir: Path, seed: int) -> Warmed:
    layers = [Layer(random_tar(seed, 150_000), "gzip"), Layer(random_tar(seed + 1, 90_000), "zstd")]
    repo = f"meta/{uuid.uuid4().hex[:10]}"
    registry.push_image(repo, "1", Image(layers))
    w = Warmed(f"{host}/{repo}:1", layers)
    p = run_layerwarm("warm", w.ref, cache_dir=cache_dir)
    assert p.returncode == 0, p.stderr
    assert entries(cache_dir) == w.names
    return w


def _one_warning(p: subprocess.CompletedProcess[str], says: str) -> str:
    """The run's one WARNING line (no traceback, no error line); it must match `says`."""
    assert "Traceback" not in p.stderr, p.stderr
    warnings = [x for x in p.stderr.splitlines() if WARNING.match(x)]
    assert len(warnings) == 1, f"want one warning line, got:\n{p.stderr}"
    assert re.search(says, warnings[0]), warnings[0]
    assert not [x for x in p.stderr.splitlines() if x.startswith(("error:", "layerwarm:"))], \
        p.stderr
    return warnings[0]


def _aside(cache_dir: Path) -> list[str]:
    return sorted(p.name for p in cache_dir.iterdir() if p.name.startswith(".meta.db.corrupt-"))


def _tree(root: Path) -> dict[str, tuple]:
    """Every path under `root`: kind, mode, and content digest or link target."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            if p.is_symlink():
                what = "link:" + os.readlink(p)
            elif p.is_dir():
                what = "dir"
            else:
                what = hashlib.sha256(p.read_bytes()).hexdigest()
            out[str(p.relative_to(root))] = (what, st.st_mode, st.st_mtime_ns)
    return out


def _verify_clean(cache_dir: Path, names: set[str]) -> None:
    p = run_layerwarm("verify", "--json", cache_dir=cache_dir, timeout=TIMEOUT)
    assert p.returncode == 0, p.stderr
    assert "WARNING" not in p.stderr, p.stderr
    checked = json.loads(p.stdout)
    assert {"sha256_" + c["digest"].removeprefix("sha256:") for c in checked} == names
    assert {c["state"] for c in checked} == {"ok"}, checked


def _warm_is_all_disk_hits(proxy: Proxy, w: Warmed, cache_dir: Path) -> None:
    proxy.reset()
    p = run_layerwarm("warm", "--json", w.ref, cache_dir=cache_dir, timeout=TIMEOUT)
    assert p.returncode == 0, p.stderr
    assert {x["source"] for x in json.loads(p.stdout)["layers"]} == {"disk"}, p.stdout
    assert _layer_gets(proxy, w) == 0, "a healed cache fetches no layer again"


def _layer_gets(proxy: Proxy, w: Warmed) -> int:
    return sum(proxy.count("GET", re.escape(f"/blobs/{x.digest}")) for x in w.layers)


def _junk(cache_dir: Path, kind: str) -> bytes | None:
    """Make `.meta.db` unusable in one way; the bytes it now holds (None: not a file)."""
    db = cache_dir / ".meta.db"
    if kind == "random bytes":
        data = random_tar(7, 40_000)[:40_000][::-1]
    elif kind == "truncated":
        data = db.read_bytes()[:5000]
    else:  # a directory
        db.unlink()
        db.mkdir()
        (db / "inside").write_bytes(b"not ours\n")
        return None
    db.write_bytes(data)
    return data


# ---------------------------------------------------------------- a database that heals


@pytest.mark.parametrize("command", ["warm", "gc", "verify", "rm"])
def test_a_writer_moves_a_corrupt_meta_db_aside_and_rebuilds_it(
    command: str, registry: RegistryServer, registry_proxy: Proxy, cache_dir: Path
) -> None:
    w = _warmed(registry, registry_proxy.host, cache_dir, 900)
    junk = _junk(cache_dir, "random bytes")
    (cache_dir / ".meta.db-wal").write_bytes(b"a wal that belongs to the junk\n")
    args = {"warm": ("warm", w.ref), "gc": ("gc",), "verify": ("verify",),
            "rm": ("rm", w.layers[0].digest)}[command]

    p = run_layerwarm(*args, cache_dir=cache_dir, timeout=TIMEOUT)

    assert p.returncode == 0, p.stderr
    aside, *others = _aside(cache_dir)
    aside_wal = aside + "-wal"
    assert set(others) <= {aside_wal, aside + "-shm"} and aside_wal in others, others
    line = _one_warning(p, re.escape(str(cache_dir / ".meta.db")))
    assert aside in line, f"the warning names where the database went: {line}"
    print(line)
    assert (cache_dir / aside).read_bytes() == junk, "the corrupt file is kept, as it was"
    assert (cache_dir / aside_wal).read_bytes() == b"a wal that belongs to the junk\n"
    left = w.names - {_name(w.layers[0])} if command == "rm" else w.names
    assert entries(cache_dir) == left
    _verify_clean(cache_dir, left)
    if command != "rm":
        _warm_is_all_disk_hits(registry_proxy, w, cache_dir)


@pytest.mark.parametrize("kind", ["truncated", "a directory"])
def test_a_truncated_or_directory_meta_db_is_moved_aside_by_a_warm(
    kind: str, registry: RegistryServer, registry_proxy: Proxy, cache_dir: Path
) -> None:
    w = _warmed(registry, registry_proxy.host, cache_dir, 910)
    junk = _junk(cache_dir, kind)
    registry_proxy.reset()

    p = run_layerwarm("warm", w.ref, cache_dir=cache_dir, timeout=TIMEOUT)

    assert p.returncode == 0, p.stderr
    aside, *others = _aside(cache_dir)
    assert set(others) <= {aside + "-wal", aside + "-shm"}, others
    print(_one_warning(p, re.escape(aside)))
    if junk is None:
        assert (cache_dir / aside / "inside").read_bytes() == b"not ours\n"
    else:
        assert (cache_dir / aside).read_bytes() == junk
    assert _layer_gets(registry_proxy, w) == 0, "the entries were adopted, not fetched again"
    _verify_clean(cache_dir, w.names)
    _warm_is_all_disk_hits(registry_proxy, w, cache_dir)


def _reader_args(command: str, w: Warmed) -> tuple[str, ...]:
    digest = w.layers[0].digest
    return {"ls": ("ls",), "df": ("df",), "metrics": ("metrics",),
            "inspect": ("inspect", digest), "usage": ("usage", digest),
            "pin --list": ("pin", "--list"), "plan": ("plan", w.ref),
            "gc --dry-run": ("gc", "--dry-run")}[command]


def _shows_the_entries(command: str, out: str, w: Warmed) -> None:
    first = w.layers[0]
    if command == "ls":
        for lay in w.layers:
            line = next(x for x in out.splitlines() if lay.digest in x)
            assert line.split()[-2:] == ["disk", "0"], line
        assert out.splitlines()[-1].startswith("2 entries, ")
    elif command == "df":
        assert re.search(r"^entries\s+2$", out, re.M), out
        total = sum(len(x.tar) for x in w.layers)
        assert f"({total} bytes)" in out, out
    elif command == "metrics":
        assert re.search(r"^layerwarm_cache_entries 2\.0$", out, re.M), out
    elif command == "inspect":
        assert re.search(rf"^tier\s+disk \S+/{_name(first)}$", out, re.M), out
        assert re.search(r"^diff_id\s+-$", out, re.M), "what only .meta.db knows is unknown"
    elif command == "usage":
        assert f"0 images use {first.digest} (on disk)" in out, out
    elif command == "plan":
        for lay in w.layers:
            line = next(x for x in out.splitlines() if lay.digest[7:19] in x)
            assert " disk " in line, line
    elif command == "gc --dry-run":
        assert out.splitlines()[-1].endswith("would evict 0 layers, 0 B freed"), out
    else:
        assert out.strip() == "no pins", out


@pytest.mark.parametrize("command", ["ls", "df", "metrics", "inspect", "usage", "pin --list",
                                     "plan", "gc --dry-run"])
def test_a_reader_on_a_corrupt_meta_db_lists_the_directory_and_writes_nothing(
    command: str, registry: RegistryServer, cache_dir: Path
) -> None:
    w = _warmed(registry, registry.host, cache_dir, 920)
    _junk(cache_dir, "random bytes")
    before = _tree(cache_dir)

    p = run_layerwarm(*_reader_args(command, w), cache_dir=cache_dir, timeout=TIMEOUT)

    assert p.returncode == 0, p.stderr
    print(_one_warning(p, re.escape(str(cache_dir / ".meta.db"))))
    _shows_the_entries(command, p.stdout, w)
    assert _tree(cache_dir) == before, "a command that only reads changed the cache"


@pytest.mark.parametrize("link", [".meta.db", ".meta.db-wal"])
def test_a_symlinked_meta_db_is_never_opened_through(
    link: str, registry: RegistryServer, registry_proxy: Proxy, cache_dir: Path, tmp_path: Path
) -> None:
    w = _warmed(registry, registry_proxy.host, cache_dir, 930)
    victim = tmp_path / "victim.db"  # a real SQLite file: SQLite would gladly write to it
    shutil.copyfile(cache_dir / ".meta.db", victim)
    victim.chmod(0o640)
    if link == ".meta.db-wal":
        victim.write_bytes(b"precious, not a wal\n" * 100)
    (cache_dir / link).unlink(missing_ok=True)
    (cache_dir / link).symlink_to(victim)
    outside = {k: v for k, v in _tree(tmp_path).items() if not k.startswith("cache")}

    r = run_layerwarm("ls", cache_dir=cache_dir, timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr
    _one_warning(r, re.escape(link))
    _shows_the_entries("ls", r.stdout, w)
    assert (cache_dir / link).is_symlink(), "a reader moves nothing"

    p = run_layerwarm("warm", w.ref, cache_dir=cache_dir, timeout=TIMEOUT)

    assert p.returncode == 0, p.stderr
    print(_one_warning(p, r"symbolic link"))
    moved = [n for n in _aside(cache_dir) if (cache_dir / n).is_symlink()]
    assert len(moved) == 1 and os.readlink(cache_dir / moved[0]) == str(victim), \
        "the link itself is renamed, still pointing where it did"
    assert not (cache_dir / link).is_symlink()
    after = {k: v for k, v in _tree(tmp_path).items() if not k.startswith("cache")}
    assert after == outside, "the link's target (or a file beside it) changed"
    _verify_clean(cache_dir, w.names)
    _warm_is_all_disk_hits(registry_proxy, w, cache_dir)


def _lines(stream, out: queue.Queue) -> None:
    for line in stream:
        out.put(line)
    out.put(None)


def test_two_writers_finding_it_corrupt_at_once_heal_it_once(
    registry: RegistryServer, registry_proxy: Proxy, cache_dir: Path
) -> None:
    w = _warmed(registry, registry_proxy.host, cache_dir, 940)
    _junk(cache_dir, "random bytes")
    lock = cache_dir / ".locks" / "meta.db.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as if a third process were repairing it right now
    procs, feeds = [], []
    try:
        for args in (("verify",), ("gc",)):
            proc = subprocess.Popen(layerwarm_cmd(*args), env=layerwarm_env(cache_dir),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    stdin=subprocess.DEVNULL)
            feed: queue.Queue = queue.Queue()
            threading.Thread(target=_lines, args=(proc.stderr, feed), daemon=True).start()
            procs.append(proc)
            feeds.append(feed)
        for proc, feed in zip(procs, feeds, strict=True):
            seen = []
            while True:  # each one found it corrupt and now waits for the lock
                line = feed.get(timeout=TIMEOUT)
                assert line is not None, f"exited {proc.wait()} without waiting:\n{''.join(seen)}"
                seen.append(line)
                if "waiting for" in line and ".meta.db" in line:
                    break
        assert _aside(cache_dir) == []
    finally:
        os.close(fd)
    for proc in procs:
        assert proc.wait(timeout=TIMEOUT) == 0
    moved = [n for n in _aside(cache_dir) if not n.endswith(("-wal", "-shm"))]
    assert len(moved) == 1, f"moved aside more than once: {_aside(cache_dir)}"
    _verify_clean(cache_dir, w.names)
    _warm_is_all_disk_hits(registry_proxy, w, cache_dir)


def _read_only(cache_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run layerwarm with the cache dir mounted read-only (a private mount namespace)."""
    script = ('mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"')
    return subprocess.run(["unshare", "-m", "sh", "-c", script, str(cache_dir),
                           *layerwarm_cmd(*args)], env=layerwarm_env(cache_dir),
                          capture_output=True, text=True, timeout=TIMEOUT,
                          stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("command", ["ls", "df"])
def test_a_reader_on_a_read_only_cache_reads_its_records(
    command: str, registry: RegistryServer, cache_dir: Path
) -> None:
    # A read-only mount cannot hold the -shm file a WAL database needs: .meta.db is then
    # opened immutable, and read in full (it used to be skipped with a warning).
    w = _warmed(registry, registry.host, cache_dir, 950)
    before = _tree(cache_dir)

    p = _read_only(cache_dir, command)

    assert p.returncode == 0, p.stderr
    assert "mount" not in p.stderr, f"could not set up the read-only mount: {p.stderr}"
    assert not p.stderr.strip(), p.stderr
    if command == "ls":  # with what .meta.db records: each layer is used by its image
        for lay in w.layers:
            line = next(x for x in p.stdout.splitlines() if lay.digest in x)
            assert line.split()[-2:] == ["disk", "1"], line
    else:
        _shows_the_entries(command, p.stdout, w)
    assert _tree(cache_dir) == before


# ---------------------------------------------------------------- bounded stored configs


@dataclass
class PaddedImage(Image):
    """An image whose config carries `padding` bytes of history, like a long Dockerfile."""

    padding: int = 0

    def config_bytes(self) -> bytes:
        config = json.loads(super().config_bytes())
        config["history"] = [{"created_by": "RUN " + "x" * self.padding}]
        return canonical_json(config)


def _push_padded(registry: RegistryServer, host: str, seed: int, padding: int) -> tuple[str, str]:
    """(ref, config digest) of a one-layer image with a config of about `padding` bytes."""
    image = PaddedImage([Layer(random_tar(seed, 20_000), "gzip")], padding=padding)
    repo = f"cfg/{uuid.uuid4().hex[:10]}"
    registry.push_image(repo, "1", image)
    return f"{host}/{repo}:1", image.config_digest


def _config_gets(proxy: Proxy, digest: str) -> int:
    return proxy.count("GET", re.escape(f"/blobs/{digest}"))


def _df(cache_dir: Path, env: dict[str, str] | None = None) -> dict:
    p = run_layerwarm("df", "--json", cache_dir=cache_dir, env=env, timeout=TIMEOUT)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def _meta_bytes(cache_dir: Path) -> int:
    return sum(os.path.getsize(cache_dir / n) for n in (".meta.db", ".meta.db-wal")
               if (cache_dir / n).exists())


def test_a_config_above_the_cap_is_not_stored_and_is_fetched_again(
    registry: RegistryServer, registry_proxy: Proxy, cache_dir: Path
) -> None:
    ref, config = _push_padded(registry, registry_proxy.host, 960, 3 << 20)  # 3 MiB
    for run in (1, 2):
        p = run_layerwarm("warm", ref, cache_dir=cache_dir, timeout=TIMEOUT)
        assert p.returncode == 0, p.stderr
        assert _config_gets(registry_proxy, config) == run, "not stored: asked for each time"
    assert "LAYERWARM_MAX_STORED_CONFIG" in p.stderr, p.stderr
    print(next(x for x in p.stderr.splitlines() if "LAYERWARM_MAX_STORED_CONFIG" in x))
    assert _meta_bytes(cache_dir) < 256 << 10, "the 3 MiB config is not in .meta.db"
    assert _df(cache_dir)["metadata"]["configs"] == 0

    # Raised, the cap lets it in: the next warm asks the registry for its manifest only.
    raised = {"LAYERWARM_MAX_STORED_CONFIG": "4MiB"}
    p = run_layerwarm("warm", ref, cache_dir=cache_dir, env=raised, timeout=TIMEOUT)
    assert p.returncode == 0, p.stderr
    p = run_layerwarm("warm", ref, cache_dir=cache_dir, env=raised, timeout=TIMEOUT)
    assert p.returncode == 0, p.stderr
    assert _config_gets(registry_proxy, config) == 3


def test_df_counts_stored_configs_and_gc_collects_the_unused_ones(
    registry: RegistryServer, registry_proxy: Proxy, cache_dir: Path
) -> None:
    pushed = [_push_padded(registry, registry_proxy.host, 970 + i, 200_000) for i in range(4)]
    for ref, _ in pushed:
        p = run_layerwarm("warm", ref, cache_dir=cache_dir, timeout=TIMEOUT)
        assert p.returncode == 0, p.stderr
    meta = _df(cache_dir)["metadata"]
    assert meta["configs"] == 4 and meta["config_bytes"] > 4 * 200_000, meta
    assert meta["bytes"] > meta["config_bytes"], meta
    p = run_layerwarm("df", cache_dir=cache_dir, timeout=TIMEOUT)
    line = next(x for x in p.stdout.splitlines() if x.startswith("metadata"))
    assert "4 image configs" in line, line
    print(line)

    p = run_layerwarm("gc", "--json", cache_dir=cache_dir, timeout=TIMEOUT)  # all used just now
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["configs_dropped"] == 0
    assert _df(cache_dir)["metadata"]["configs"] == 4
    before = _meta_bytes(cache_dir)

    ttl0 = {"LAYERWARM_STORED_CONFIG_TTL": "0s"}  # anything not used this instant is old
    p = run_layerwarm("gc", cache_dir=cache_dir, env=ttl0, timeout=TIMEOUT)
    assert p.returncode == 0, p.stderr
    assert re.search(r"^dropped 4 stored image configs", p.stdout, re.M), p.stdout
    meta = _df(cache_dir)["metadata"]
    assert meta["configs"] == 0 and meta["config_bytes"] == 0, meta
    assert _meta_bytes(cache_dir) < before / 4, "gc gave the space back"
    assert entries(cache_dir), "configs go, entries stay"

    registry_proxy.reset()
    ref, config = pushed[0]
    p = run_layerwarm("warm", ref, cache_dir=cache_dir, timeout=TIMEOUT)
    assert p.returncode == 0, p.stderr
    assert _config_gets(registry_proxy, config) == 1, "a collected config is fetched again"
    assert registry_proxy.count() == 1, "and only it: the layers are disk hits"
    with sqlite3.connect(cache_dir / ".meta.db") as db:  # the integrity a user can check
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)


def test_configs_stored_before_their_use_was_kept_stay_for_a_whole_ttl(
    registry: RegistryServer, registry_proxy: Proxy, cache_dir: Path
) -> None:
    image = PaddedImage([Layer(random_tar(980, 20_000), "gzip")], padding=1000)
    repo = f"cfg/{uuid.uuid4().hex[:10]}"
    registry.push_image(repo, "1", image)
    with sqlite3.connect(cache_dir / ".meta.db") as old:  # the configs table as it was
        old.execute("CREATE TABLE configs (digest TEXT PRIMARY KEY, data BLOB NOT NULL)")
        old.execute("INSERT INTO configs VALUES (?, ?)", (image.config_digest,
                                                          image.config_bytes()))
    old.close()

    p = run_layerwarm("gc", "--json", cache_dir=cache_dir, timeout=TIMEOUT)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["configs_dropped"] == 0, "an upgrade does not empty it"
    p = run_layerwarm("warm", f"{registry_proxy.host}/{repo}:1", cache_dir=cache_dir,
                      timeout=TIMEOUT)
    assert p.returncode == 0, p.stderr
    assert _config_gets(registry_proxy, image.config_digest) == 0, "read from .meta.db"
