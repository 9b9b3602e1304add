"""Reading an image's files from the cache: the index beside each layer, `files`, `cat`,
`export`, and reads of a layer that is only in the remote tier (the index and the byte
ranges read, never the layer), through the real CLI against a real registry and S3.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import stat
import tarfile
import uuid
from pathlib import Path

import pytest

from pipeline.digest import Digest
from pipeline.fileindex import CHUNK_SIZE, LayerIndex
from tests.support.cli import run_layerwarm
from tests.support.faults import S3Proxy
from tests.support.images import Image, Layer
from tests.support.registry import RegistryServer
from tests.support.s3 import S3Server
from tests.support.tarindex_ref import assert_content
from tests.support.tars import Dir, File, Hardlink, Symlink, Whiteout, make_tar

TOOL = random.Random(1).randbytes(300_000)
BIG = random.Random(2).randbytes(CHUNK_SIZE + (1 << 20))  # two chunks
OLD_RELEASE, NEW_RELEASE = b"NAME=old\n", b"NAME=layerwarm\nVERSION=2\n"
LOWER = Layer(make_tar([
    Dir("bin"), File("bin/tool", TOOL, 0o755), Hardlink("bin/tool2", "bin/tool"),
    Dir("etc"), File("etc/os-release", OLD_RELEASE), Symlink("etc/alt", "os-release"),
    File("etc/gone", b"removed above\n"), Dir("data"), File("data/big.bin", BIG),
]), "gzip")
LONG = "a/" + "n" * 200 + "/" + "m" * 200  # a path past GNU tar's 100 and ustar's 255 bytes
UPPER = Layer(make_tar([
    Dir("etc"), File("etc/os-release", NEW_RELEASE), Whiteout("etc/gone"),
]), "zstd")


@pytest.fixture(scope="module")
def image(registry: RegistryServer) -> str:
    repo = f"read/{uuid.uuid4().hex[:10]}"
    registry.push_image(repo, "1", Image([LOWER, UPPER]))
    return f"{registry.host}/{repo}:1"


def _ok(*args: str, cache_dir: Path, env: dict[str, str] | None = None):  # noqa: ANN202
    done = run_layerwarm(*args, cache_dir=cache_dir, env=env)
    assert done.returncode == 0, f"{args}: exit {done.returncode}\n{done.stderr}"
    assert "Traceback" not in done.stderr, done.stderr
    return done


def _cat(image: str, *paths: str, cache_dir: Path, env: dict[str, str] | None = None):  # noqa: ANN202
    import subprocess

    from tests.support.cli import layerwarm_cmd, layerwarm_env

    return subprocess.run(layerwarm_cmd("cat", image, *paths), env=layerwarm_env(cache_dir, env),
                          capture_output=True, timeout=120, stdin=subprocess.DEVNULL)


def test_a_warm_stores_each_layers_index_beside_it(image: str, cache_dir: Path,
                                                   tmp_path: Path) -> None:
    def index_in(root: Path, lay: Layer) -> LayerIndex:
        name = "sha256_" + lay.digest.removeprefix("sha256:")
        return LayerIndex.loads((root / ".index" / name).read_bytes(),
                                expect=Digest.parse(lay.diff_id))

    def entry(lay: Layer) -> bytes:
        return (cache_dir / ("sha256_" + lay.digest.removeprefix("sha256:"))).read_bytes()

    # Cached on disk only: where each file lies, no content digests (nothing to check).
    _ok("warm", image, cache_dir=cache_dir)
    for lay in (LOWER, UPPER):
        index = index_in(cache_dir, lay)
        assert not index.digests
        assert_content(entry(lay), index)
    # Published: the digests a remote read is checked against, in both tiers.
    shared, publisher = tmp_path / "shared", tmp_path / "publisher"
    _ok("warm", image, "--remote", shared.as_uri(), cache_dir=publisher)
    for lay in (LOWER, UPPER):
        for root in (publisher, shared):
            index = index_in(root, lay)
            assert index.digests, root
            assert_content(entry(lay), index)
    lower = index_in(shared, LOWER)
    big = next(e for e in lower.entries if e.path == "data/big.bin")
    assert big.chunks == (hashlib.sha256(BIG[:CHUNK_SIZE]).hexdigest(),
                          hashlib.sha256(BIG[CHUNK_SIZE:]).hexdigest())
    upper = LayerIndex.loads((cache_dir / ".index" / ("sha256_" + UPPER.digest[7:])).read_bytes())
    assert {(e.path, e.kind) for e in upper.entries} >= {("etc/gone", "whiteout")}


def test_files_lists_the_merged_tree(image: str, cache_dir: Path) -> None:
    got = json.loads(_ok("files", image, "-R", "--json", cache_dir=cache_dir).stdout)
    by_path = {x["path"]: x for x in got}
    assert set(by_path) == {"/bin", "/bin/tool", "/bin/tool2", "/etc", "/etc/os-release",
                            "/etc/alt", "/data", "/data/big.bin"}, sorted(by_path)
    assert by_path["/etc/os-release"]["size"] == len(NEW_RELEASE)
    # A layer cached on disk only has no content digests (they come with publishing).
    assert by_path["/etc/os-release"]["digest"] is None
    assert by_path["/bin/tool"]["nlink"] == 2 and by_path["/bin/tool"]["mode"] == "0755"
    assert by_path["/etc/alt"]["type"] == "symlink" and by_path["/etc/alt"]["link"] == "os-release"

    lines = _ok("files", image, "/etc", cache_dir=cache_dir).stdout.splitlines()
    assert lines[0].split() == ["MODE", "LINKS", "OWNER", "GROUP", "SIZE", "MODIFIED", "PATH"]
    assert lines[-1] == "2 entries", lines
    assert any(ln.startswith("lrwxrwxrwx") and ln.endswith("/etc/alt -> os-release")
               for ln in lines), lines

    # The long listing, recursive, says what the JSON says: every path, in the same order,
    # with its mode, link count, size and link target; from a directory, only below it.
    def listed(*where: str) -> list[list[str]]:
        out = _ok("files", image, *where, "-R", cache_dir=cache_dir).stdout.splitlines()
        assert out[-1] == f"{len(out) - 2} entries", out
        return [ln.split() for ln in out[1:-1]]

    def mode(x: dict) -> str:
        kind = {"file": stat.S_IFREG, "dir": stat.S_IFDIR, "symlink": stat.S_IFLNK}
        return stat.filemode(kind[x["type"]] | int(x["mode"], 8))

    want = [[mode(x), str(x["nlink"]), str(x["size"]), x["path"]]
            + (["->", x["link"]] if x["type"] == "symlink" else []) for x in got]
    assert [[c[0], c[1], c[4], *c[6:]] for c in listed()] == want
    assert [c[6] for c in listed("/etc")] == ["/etc/alt", "/etc/os-release"]
    # Options go anywhere among the operands, as with ls or skopeo.
    assert _ok("files", image, "-R", "/etc", cache_dir=cache_dir).stdout \
        == _ok("files", "-R", image, "/etc", cache_dir=cache_dir).stdout


def test_cat_writes_the_files_bytes_following_links_inside_the_image(image: str,
                                                                     cache_dir: Path) -> None:
    done = _cat(image, "/etc/alt", "bin/tool2", "/data/big.bin", cache_dir=cache_dir)
    assert done.returncode == 0, done.stderr
    assert done.stdout == NEW_RELEASE + TOOL + BIG
    done = _cat(image, "/etc/alt", "--pull", "never", "bin/tool2", cache_dir=cache_dir)
    assert done.returncode == 0 and done.stdout == NEW_RELEASE + TOOL, done.stderr
    for path, says in (("/etc", "not a regular file"), ("/etc/gone", "no such file")):
        done = _cat(image, path, cache_dir=cache_dir)
        assert done.returncode == 1 and done.stdout == b"", done
        lines = done.stderr.decode().strip().splitlines()
        assert len(lines) == 1 and says in lines[0] and "Traceback" not in lines[0], lines


def test_export_as_a_tar_and_as_a_tree(image: str, cache_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "image.tar"
    _ok("export", image, "-o", str(out), cache_dir=cache_dir)
    with tarfile.open(out) as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert set(members) == {"bin", "bin/tool", "bin/tool2", "etc", "etc/os-release",
                                "etc/alt", "data", "data/big.bin"}
        assert tar.extractfile("etc/os-release").read() == NEW_RELEASE
        assert tar.extractfile("data/big.bin").read() == BIG
        assert members["bin/tool2"].islnk() and members["bin/tool2"].linkname == "bin/tool"
        assert members["etc/alt"].issym() and members["etc/alt"].linkname == "os-release"
        assert members["bin/tool"].mode == 0o755

    tree = tmp_path / "rootfs"
    _ok("export", image, "--dir", str(tree), cache_dir=cache_dir)
    assert (tree / "etc/os-release").read_bytes() == NEW_RELEASE
    assert (tree / "bin/tool").read_bytes() == TOOL
    assert os.stat(tree / "bin/tool").st_ino == os.stat(tree / "bin/tool2").st_ino
    assert os.readlink(tree / "etc/alt") == "os-release"
    assert os.stat(tree / "bin/tool").st_mode & 0o7777 == 0o755
    assert not (tree / "etc/gone").exists()
    done = run_layerwarm("export", image, "--dir", str(tree), cache_dir=cache_dir)
    assert done.returncode == 2 and "not empty" in done.stderr, done.stderr


def test_an_entry_cached_before_indexes_is_indexed_on_first_use(image: str,
                                                                cache_dir: Path) -> None:
    _ok("warm", image, cache_dir=cache_dir)
    shutil.rmtree(cache_dir / ".index")
    done = _cat(image, "/etc/os-release", cache_dir=cache_dir)
    assert done.returncode == 0 and done.stdout == NEW_RELEASE, done.stderr
    assert sorted(p.name for p in (cache_dir / ".index").iterdir()) == sorted(
        "sha256_" + x.digest[7:] for x in (LOWER, UPPER))


def test_a_layer_only_in_s3_is_read_by_its_index_and_the_ranges_read(
    image: str, s3: S3Server, tmp_path: Path
) -> None:
    bucket = s3.create_bucket(f"read-{uuid.uuid4().hex[:8]}")
    remote = f"s3://{bucket}/layers"
    _ok("warm", image, "--remote", remote, cache_dir=tmp_path / "warmer", env=s3.env())
    with S3Proxy(s3.url) as proxy:
        env = proxy.env(s3.env())
        reader = tmp_path / "reader"  # another machine: nothing on its disk
        done = _cat(image, "/bin/tool", "--remote", remote, cache_dir=reader, env=env)
        assert done.returncode == 0, done.stderr
        assert done.stdout == TOOL
        hits = proxy.requests_log
    index_bytes = sum(h.bytes_sent for h in hits if h.path.split("?")[0].endswith(".index"))
    total = sum(h.bytes_sent for h in hits)
    layer_gets = [h for h in hits if h.method == "GET" and not h.path.split("?")[0].endswith(
        ".index") and "sha256_" in h.path]
    assert index_bytes > 0, hits
    assert total <= index_bytes + len(TOOL) + (1 << 20), (total, hits)
    assert len(layer_gets) >= 1 and sum(h.bytes_sent for h in layer_gets) < LOWER.size, hits
    assert not [p for p in reader.glob("sha256_*")], "cat made no cache entry"


def test_a_corrupt_range_in_the_remote_tier_is_an_error_never_its_bytes(
    image: str, tmp_path: Path
) -> None:
    shared = tmp_path / "shared"
    remote = shared.as_uri()
    _ok("warm", image, "--remote", remote, cache_dir=tmp_path / "warmer")
    name = "sha256_" + LOWER.digest[7:]
    data = bytearray((shared / name).read_bytes())
    at = data.find(TOOL[:64])
    data[at + 1000] ^= 0xFF
    (shared / name).write_bytes(bytes(data))
    done = _cat(image, "/bin/tool", "--remote", remote, cache_dir=tmp_path / "reader")
    assert done.returncode == 1 and done.stdout == b"", (done.returncode, len(done.stdout))
    error = [ln for ln in done.stderr.decode().splitlines() if ln.startswith("layerwarm:")]
    assert len(error) == 1 and LOWER.digest in error[0] and "file index" in error[0], \
        done.stderr.decode()


def test_hostile_names_stay_out_of_the_view_and_the_exported_tree(
    registry: RegistryServer, cache_dir: Path, tmp_path: Path
) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in (("ok.txt", b"fine\n"), ("../escape.txt", b"out\n"),
                           ("/abs.txt", b"abs\n"), (LONG, b"long\n")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("evil")
        link.type, link.linkname = tarfile.LNKTYPE, "../../etc/passwd"
        tar.addfile(link)
        sym = tarfile.TarInfo("up")
        sym.type, sym.linkname = tarfile.SYMTYPE, "../../.."
        tar.addfile(sym)
    repo = f"read/{uuid.uuid4().hex[:10]}"
    registry.push_image(repo, "1", Image([Layer(buf.getvalue(), "gzip")]))
    ref = f"{registry.host}/{repo}:1"
    done = _ok("warm", ref, cache_dir=cache_dir)
    assert "left out of its file index" in done.stderr, done.stderr
    listed = {x["path"] for x in json.loads(
        _ok("files", ref, "-R", "--json", cache_dir=cache_dir).stdout)}
    # A leading "/" is dropped, as tar extractors do ("Removing leading `/'"): in the image.
    assert listed == {"/ok.txt", "/abs.txt", "/a", "/a/" + "n" * 200, "/" + LONG, "/up"}, listed
    tree = tmp_path / "out" / "rootfs"
    tree.parent.mkdir()
    _ok("export", ref, "--dir", str(tree), cache_dir=cache_dir)
    assert sorted(p.name for p in tree.parent.iterdir()) == ["rootfs"], "nothing beside DIR"
    assert os.readlink(tree / "up") == "../../.."  # a name in the tree, never followed
    done = _cat(ref, "/up/etc/passwd", cache_dir=cache_dir)
    assert done.returncode == 1 and done.stdout == b"", done.stdout[:100]


def test_a_layer_published_before_indexes_gets_its_index_from_its_first_reader(
    image: str, tmp_path: Path
) -> None:
    shared = tmp_path / "shared"
    _ok("warm", image, "--remote", shared.as_uri(), cache_dir=tmp_path / "warmer")
    shutil.rmtree(shared / ".index")  # as a layer published by an older layerwarm
    first = _cat(image, "/bin/tool", "--remote", shared.as_uri(), cache_dir=tmp_path / "one")
    assert first.returncode == 0 and first.stdout == TOOL, first.stderr
    assert (tmp_path / "one" / ("sha256_" + LOWER.digest[7:])).exists(), "restored whole, once"
    assert (shared / ".index" / ("sha256_" + LOWER.digest[7:])).is_file(), "its index put back"
    second = _cat(image, "/bin/tool", "--remote", shared.as_uri(), cache_dir=tmp_path / "two")
    assert second.returncode == 0 and second.stdout == TOOL, second.stderr
    assert not list((tmp_path / "two").glob("sha256_*")), "the next reader reads ranges only"


def test_an_image_the_cache_resolved_is_read_without_its_registry(
    registry: RegistryServer, cache_dir: Path
) -> None:
    """As a container engine's image store: once warmed (or read), a tag is what it was
    then, whether or not its registry answers; `--pull always` asks it again, and
    `--pull never` reads only what the cache already resolved."""
    from tests.support.proxy import Proxy

    repo = f"read/{uuid.uuid4().hex[:10]}"
    registry.push_image(repo, "1", Image([LOWER, UPPER]))
    with Proxy(registry.url) as proxy:
        ref = f"{proxy.host}/{repo}:1"
        never = run_layerwarm("files", ref, "--pull", "never", cache_dir=cache_dir)
        assert never.returncode != 0 and "Traceback" not in never.stderr
        assert never.stderr.strip().count("\n") == 0, never.stderr
        assert "not in the cache" in never.stderr and "--pull missing" in never.stderr
        _ok("warm", ref, cache_dir=cache_dir)
        proxy.reset()
        assert _cat(ref, "/etc/os-release", cache_dir=cache_dir).stdout == NEW_RELEASE
        assert proxy.requests_log == [], "the registry was asked again"

        # The tag moves on the registry: the cache reads what it resolved, until asked.
        registry.push_image(repo, "1", Image([LOWER]))
        assert _cat(ref, "/etc/os-release", cache_dir=cache_dir).stdout == NEW_RELEASE
        pulled = run_layerwarm("cat", ref, "/etc/os-release", "--pull", "always",
                               cache_dir=cache_dir)
        assert pulled.returncode == 0, pulled.stderr
        assert pulled.stdout == OLD_RELEASE.decode()
        assert _cat(ref, "/etc/os-release", cache_dir=cache_dir).stdout == OLD_RELEASE
    # The registry is gone now: what the cache resolved is still read, files and all.
    assert _cat(ref, "/bin/tool", cache_dir=cache_dir).stdout == TOOL
    gone = run_layerwarm("files", ref, "--pull", "always", cache_dir=cache_dir)
    assert gone.returncode != 0 and "Traceback" not in gone.stderr, gone.stderr
    assert proxy.host in gone.stderr, gone.stderr
