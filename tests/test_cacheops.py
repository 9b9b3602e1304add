"""Operating the cache: `ls`, `inspect`, `usage`, `rm`, `df` on real files, real SQLite and a
real registry. Two images share a base layer; each command is checked against what the
images are made of, and every safety rule of issue 6 has a test here."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline import cli
from tests.support.cli import entries, layerwarm_cmd, layerwarm_env, run_layerwarm
from tests.support.images import Image, Layer, random_tar
from tests.support.proxy import Proxy
from tests.support.registry import RegistryServer


def _name(lay: Layer) -> str:
    return "sha256_" + lay.digest.removeprefix("sha256:")


@dataclass
class Warmed:
    base: Layer
    app1: Layer
    app2: Layer
    refs: tuple[str, str]
    manifests: tuple[str, str]


def _warm_two(registry: RegistryServer, host: str, cache_dir: Path, seed: int,
              extra: tuple[str, ...] = ()) -> Warmed:
    """Two images, [base, app1] and [base, app2], warmed into cache_dir."""
    base = Layer(random_tar(seed, 300_000), "gzip")
    app1 = Layer(random_tar(seed + 1, 120_000), "zstd")
    app2 = Layer(random_tar(seed + 2, 80_000), "gzip")
    repo = f"ops/{uuid.uuid4().hex[:10]}"
    m1 = registry.push_image(repo, "one", Image([base, app1]))
    m2 = registry.push_image(repo, "two", Image([base, app2]))
    refs = (f"{host}/{repo}:one", f"{host}/{repo}:two")
    p = run_layerwarm("warm", *extra, *refs, cache_dir=cache_dir)
    assert p.returncode == 0, p.stderr
    return Warmed(base, app1, app2, refs, (m1, m2))


def _json(*args: str, cache_dir: Path) -> object:
    p = run_layerwarm(*args, "--json", cache_dir=cache_dir)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def test_ls_lists_each_entry_with_its_size_and_image_count(
    registry: RegistryServer, cache_dir: Path
) -> None:
    w = _warm_two(registry, registry.host, cache_dir, 600)
    listed = {e["digest"]: e for e in _json("ls", cache_dir=cache_dir)}
    assert set(listed) == {w.base.digest, w.app1.digest, w.app2.digest}
    for lay, users in ((w.base, 2), (w.app1, 1), (w.app2, 1)):
        e = listed[lay.digest]
        assert e["size"] == len(lay.tar) and e["tiers"] == ["disk"]
        assert e["diff_id"] == lay.diff_id and e["last_used"].endswith("Z")
        assert len({i["manifest_digest"] for i in e["images"]}) == users
    assert {i["ref"] for i in listed[w.base.digest]["images"]} == set(w.refs)

    p = run_layerwarm("ls", cache_dir=cache_dir)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0].split() == ["LAYER", "SIZE", "LAST", "USED", "TIERS", "IMAGES"]
    base_line = next(x for x in lines if w.base.digest in x)
    assert base_line.split()[-2:] == ["disk", "2"]
    assert lines[-1].startswith("3 entries, ")


def test_files_are_the_source_of_truth(registry: RegistryServer, cache_dir: Path,
                                       tmp_path: Path) -> None:
    w = _warm_two(registry, registry.host, cache_dir, 610)
    (cache_dir / _name(w.app2)).unlink()  # behind layerwarm's back: its row remains
    (cache_dir / "sha256_not-a-digest").write_bytes(b"junk")
    listed = {e["digest"] for e in _json("ls", cache_dir=cache_dir)}
    assert listed == {w.base.digest, w.app1.digest}

    # An entry without a row (copied from elsewhere) is listed, with what is unknown as such.
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(cache_dir / _name(w.app1), other / _name(w.app1))
    [e] = _json("ls", cache_dir=other)
    assert e["digest"] == w.app1.digest and e["size"] == len(w.app1.tar)
    assert e["diff_id"] is None and e["last_used"] is None and e["images"] == []
    p = run_layerwarm("ls", cache_dir=other)
    assert p.returncode == 0 and w.app1.digest in p.stdout and " - " in p.stdout
    assert not (other / ".meta.db").exists(), "reading must not create the database"


def test_usage_lists_exactly_the_images_using_a_layer(
    registry: RegistryServer, cache_dir: Path
) -> None:
    w = _warm_two(registry, registry.host, cache_dir, 620)
    for spelling in (w.base.digest, _name(w.base)):
        got = _json("usage", spelling, cache_dir=cache_dir)
        assert got["digest"] == w.base.digest and got["cached"] is True
        assert sorted((i["ref"], i["manifest_digest"]) for i in got["images"]) == sorted(
            zip(w.refs, w.manifests, strict=True))
    got = _json("usage", w.app2.digest, cache_dir=cache_dir)
    assert [(i["ref"], i["manifest_digest"]) for i in got["images"]] == [
        (w.refs[1], w.manifests[1])]

    p = run_layerwarm("usage", w.base.digest, cache_dir=cache_dir)
    assert p.returncode == 0, p.stderr
    for ref, manifest in zip(w.refs, w.manifests, strict=True):
        assert any(ref in x and manifest in x for x in p.stdout.splitlines())
    assert f"2 images use {w.base.digest} (on disk)" in p.stdout


def test_usage_follows_a_tag_that_moved(registry: RegistryServer, cache_dir: Path) -> None:
    w = _warm_two(registry, registry.host, cache_dir, 640)
    repo = w.refs[0].split("/", 1)[1].rsplit(":", 1)[0]
    moved = registry.push_image(repo, "one", Image([w.base, w.app2]))  # "one" now = [base, app2]
    p = run_layerwarm("warm", w.refs[0], cache_dir=cache_dir)
    assert p.returncode == 0, p.stderr

    got = _json("usage", w.app1.digest, cache_dir=cache_dir)
    assert got["images"] == [], "the old manifest of the moved tag still claims app1"
    got = _json("usage", w.app2.digest, cache_dir=cache_dir)
    assert sorted((i["ref"], i["manifest_digest"]) for i in got["images"]) == sorted(
        [(w.refs[0], moved), (w.refs[1], w.manifests[1])])


def test_rm_then_warm_refetches_just_that_layer(
    registry: RegistryServer, registry_proxy: Proxy, cache_dir: Path
) -> None:
    w = _warm_two(registry, registry_proxy.host, cache_dir, 630)
    p = run_layerwarm("rm", w.app1.digest, cache_dir=cache_dir)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == f"removed {w.app1.digest} from disk"
    assert entries(cache_dir) == {_name(w.base), _name(w.app2)}
    assert w.app1.digest not in {e["digest"] for e in _json("ls", cache_dir=cache_dir)}
    # The image still uses the layer; it just is not cached now.
    assert _json("usage", w.app1.digest, cache_dir=cache_dir)["cached"] is False

    registry_proxy.reset()
    p = run_layerwarm("warm", *w.refs, cache_dir=cache_dir)
    assert p.returncode == 0, p.stderr
    assert registry_proxy.count("GET", f"/blobs/{w.app1.digest}") == 1
    assert registry_proxy.count("GET", f"/blobs/{w.base.digest}") == 0
    assert registry_proxy.count("GET", f"/blobs/{w.app2.digest}") == 0
    assert (cache_dir / _name(w.app1)).read_bytes() == w.app1.tar

    # Removing what is not cached says so, and exits 1 (after removing the others).
    p = run_layerwarm("rm", _name(w.app2), w.app2.digest, cache_dir=cache_dir)
    assert p.returncode == 1
    assert f"removed {w.app2.digest} from disk" in p.stdout
    assert f"error: {w.app2.digest}: not in the cache" in p.stderr
    assert entries(cache_dir) == {_name(w.base), _name(w.app1)}


def test_rm_remote_removes_the_remote_object(
    registry: RegistryServer, cache_dir: Path, tmp_path: Path
) -> None:
    shared = tmp_path / "shared" / "prefix"
    shared.parent.mkdir()
    url = shared.as_uri()
    w = _warm_two(registry, registry.host, cache_dir, 640, extra=("--remote", url))
    assert (shared / _name(w.app1)).exists()

    # inspect sees both tiers, with the disk row's details.
    got = _json("inspect", w.app1.digest, "--remote", url, cache_dir=cache_dir)
    assert got["tiers"] == ["disk", "remote"] and got["remote_size"] == len(w.app1.tar)

    # Without --remote, rm leaves the remote tier alone, even with LAYERWARM_REMOTE set.
    p = run_layerwarm("rm", w.app2.digest, cache_dir=cache_dir,
                      env={"LAYERWARM_REMOTE": url})
    assert p.returncode == 0, p.stderr
    assert (shared / _name(w.app2)).exists() and not (cache_dir / _name(w.app2)).exists()

    p = run_layerwarm("rm", "--remote", url, w.app1.digest, w.app2.digest, cache_dir=cache_dir)
    assert p.returncode == 0, p.stderr
    assert f"removed {w.app1.digest} from disk and remote" in p.stdout
    assert f"removed {w.app2.digest} from remote" in p.stdout
    assert not (shared / _name(w.app1)).exists() and not (shared / _name(w.app2)).exists()
    assert (shared / _name(w.base)).exists() and (cache_dir / _name(w.base)).exists()

    # ls --remote: the base is in both tiers; nothing else is left anywhere.
    listed = _json("ls", "--remote", url, cache_dir=cache_dir)
    assert [(e["digest"], e["tiers"]) for e in listed] == [(w.base.digest, ["disk", "remote"])]


def test_inspect_shows_what_the_cache_knows(
    registry: RegistryServer, cache_dir: Path, tmp_path: Path
) -> None:
    url = (tmp_path / "shared").as_uri()
    w = _warm_two(registry, registry.host, cache_dir, 650, extra=("--remote", url))
    got = _json("inspect", _name(w.base), cache_dir=cache_dir)
    assert got["digest"] == w.base.digest and got["diff_id"] == w.base.diff_id
    assert got["media_type"] == w.base.media_type
    assert got["compressed_size"] == w.base.size
    assert got["uncompressed_size"] == got["disk_size"] == len(w.base.tar)
    assert got["tiers"] == ["disk"]  # no remote asked for
    assert sorted((i["ref"], i["manifest_digest"], i["platform"]) for i in got["images"]) == (
        sorted((r, m, "linux/amd64") for r, m in zip(w.refs, w.manifests, strict=True)))

    p = run_layerwarm("inspect", w.base.digest, "--remote", url, cache_dir=cache_dir)
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert f"diff_id       {w.base.diff_id}" in out
    assert f"media type    {w.base.media_type}" in out
    assert f"({len(w.base.tar)} bytes)" in out and f"({w.base.size} bytes)" in out
    assert f"tier          disk {cache_dir / _name(w.base)}" in out
    assert f"tier          remote {url}/{_name(w.base)}" in out
    assert all(r in out for r in w.refs) and all(m in out for m in w.manifests)

    # Only in the remote tier: details come from the object's metadata.
    (cache_dir / _name(w.app1)).unlink()
    got = _json("inspect", w.app1.digest, "--remote", url, cache_dir=cache_dir)
    assert got["tiers"] == ["remote"] and got["diff_id"] == w.app1.diff_id
    assert got["media_type"] == w.app1.media_type and got["compressed_size"] == w.app1.size

    p = run_layerwarm("inspect", w.app1.digest, cache_dir=cache_dir)
    assert p.returncode == 1 and "not in the cache" in p.stderr


def test_df_reports_bytes_saved_by_sharing(registry: RegistryServer, cache_dir: Path) -> None:
    w = _warm_two(registry, registry.host, cache_dir, 660)
    total = len(w.base.tar) + len(w.app1.tar) + len(w.app2.tar)
    got = _json("df", cache_dir=cache_dir)
    assert got["entries"] == 3 and got["bytes"] == total and got["images"] == 2
    assert got["shared_entries"] == 1
    assert got["saved_bytes"] == len(w.base.tar)  # the base is stored once, used twice
    p = run_layerwarm("df", cache_dir=cache_dir)
    assert p.returncode == 0, p.stderr
    assert f"({len(w.base.tar)} bytes)" in p.stdout and "entries        3" in p.stdout


HOSTILE = (
    "sha256:../../victim", "../victim", "sha256_" + "A" * 64,
    "sha256:" + "0" * 11, "sha256:" + "0" * 65,  # a prefix needs 12 to 63 hex
    "sha256:" + "0" * 64 + "/..", "sha256_" + "0" * 64 + "\n", "sha256_../../.meta.db", "",
    " sha256:" + "0" * 64, "sha512:" + "0" * 64, "md5:" + "0" * 32, "latest", "-",
    "sha256:" + "0" * 64 + "\nsha256:" + "1" * 64, "sha256_" + "0" * 64 + ".lock",
)


def test_hostile_digests_are_refused_and_nothing_outside_is_touched(
    registry: RegistryServer, cache_dir: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    shared = tmp_path / "shared" / "prefix"
    shared.parent.mkdir()
    url = shared.as_uri()
    w = _warm_two(registry, registry.host, cache_dir, 670, extra=("--remote", url))
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    # The same name outside the cache dir and outside the prefix must survive an rm.
    for outside in (tmp_path / _name(w.app1), tmp_path / "shared" / _name(w.app1)):
        outside.write_bytes(b"not the cache")
    before = entries(cache_dir)

    for bad in HOSTILE:  # in-process for the whole corpus (a subprocess each is slow) ...
        for args in (("rm", "--remote", url, "--", bad), ("inspect", "--", bad),
                     ("usage", "--", bad)):
            assert cli.main([args[0], "--cache-dir", str(cache_dir), *args[1:]]) == 2, args
            err = capsys.readouterr().err
            assert "invalid digest" in err and len(err.strip().splitlines()) == 1, (args, err)
    for bad in HOSTILE[:3]:  # ... and as a user runs it
        p = run_layerwarm("rm", "--remote", url, "--", bad, cache_dir=cache_dir)
        assert p.returncode == 2 and "invalid digest" in p.stderr, p.stderr
    # One bad digest among good ones: nothing at all is removed.
    p = run_layerwarm("rm", w.app2.digest, "../victim", cache_dir=cache_dir)
    assert p.returncode == 2 and (cache_dir / _name(w.app2)).exists()
    assert entries(cache_dir) == before and victim.read_text() == "keep me"

    p = run_layerwarm("rm", "--remote", url, w.app1.digest, cache_dir=cache_dir)
    assert p.returncode == 0, p.stderr
    assert not (cache_dir / _name(w.app1)).exists() and not (shared / _name(w.app1)).exists()
    for outside in (tmp_path / _name(w.app1), tmp_path / "shared" / _name(w.app1)):
        assert outside.read_bytes() == b"not the cache"

    # A symlinked entry: rm removes the link, never what it points at.
    link = cache_dir / _name(w.app1)
    link.symlink_to(victim)
    assert run_layerwarm("rm", w.app1.digest, cache_dir=cache_dir).returncode == 0
    assert not link.is_symlink() and victim.read_text() == "keep me"


def test_read_only_commands_on_a_missing_cache_create_nothing(tmp_path: Path) -> None:
    missing = tmp_path / "never" / "cache"
    digest = "sha256:" + "ab" * 32
    for args in (("ls",), ("ls", "--json"), ("df",), ("df", "--json"), ("usage", digest),
                 ("usage", digest, "--json")):
        p = run_layerwarm(*args, cache_dir=missing)
        assert p.returncode == 0, (args, p.stderr)
    assert json.loads(run_layerwarm("ls", "--json", cache_dir=missing).stdout) == []
    assert run_layerwarm("ls", cache_dir=missing).stdout.strip().endswith("0 entries, 0 B")
    df = json.loads(run_layerwarm("df", "--json", cache_dir=missing).stdout)
    assert df["entries"] == df["bytes"] == df["saved_bytes"] == 0
    assert json.loads(run_layerwarm("usage", digest, "--json", cache_dir=missing).stdout)[
        "images"] == []
    for args in (("inspect", digest), ("rm", digest)):
        p = run_layerwarm(*args, cache_dir=missing)
        assert p.returncode == 1 and "not in the cache" in p.stderr, args
    assert not (tmp_path / "never").exists()


_HOLD_LOCK = """
import sys
from pathlib import Path
from pipeline.digest import Digest
from pipeline.tiers.disk import DiskTier
lock = DiskTier(Path(sys.argv[1])).lock(Digest.parse(sys.argv[2]))
lock.acquire()
print("locked", flush=True)
sys.stdin.readline()  # hold it until told to let go
"""


def test_rm_waits_for_the_digest_lock(registry: RegistryServer, cache_dir: Path) -> None:
    w = _warm_two(registry, registry.host, cache_dir, 680)
    entry = cache_dir / _name(w.base)
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(cache_dir), w.base.digest],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    rm = None
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        rm = subprocess.Popen(layerwarm_cmd("rm", w.base.digest), env=layerwarm_env(cache_dir),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert rm.stderr is not None
        assert "waiting for its lock" in rm.stderr.readline()
        time.sleep(1.0)
        assert rm.poll() is None, "rm must wait while a warm holds the digest's lock"
        assert entry.exists()
        assert holder.stdin is not None
        holder.stdin.write("go\n")
        holder.stdin.flush()
        out, err = rm.communicate(timeout=30)
    finally:
        holder.kill()
        holder.wait()
        if rm is not None and rm.poll() is None:
            rm.kill()
            rm.wait()
    assert rm.returncode == 0, err
    assert out.strip() == f"removed {w.base.digest} from disk"
    assert not entry.exists()
    assert w.base.digest not in {e["digest"] for e in _json("ls", cache_dir=cache_dir)}
