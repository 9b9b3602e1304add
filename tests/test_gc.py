"""`layerwarm gc`: LRU eviction under a quota (each inode counted once), pins and locks
spared, temp/staging sweep, rows and files reconciled, the automatic quota after a warm,
a gc loop racing a warm, and `gc --remote` on moto S3 and on a directory tier.

Everything is real: the registry, SQLite, files, flock(2) held by this process while the
`layerwarm` subprocess runs gc, the S3 server. Assertions are what a user would check:
which files remain, their bytes, exit codes, the printed report and the counters."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import threading
import time
import uuid
from pathlib import Path

from pipeline import gc
from pipeline.digest import Digest
from pipeline.metadata import Metadata
from pipeline.tiers.directory import DirectoryTier
from pipeline.tiers.disk import DiskTier
from pipeline.tiers.s3 import S3Tier
from tests.support.cli import entries, layerwarm_cmd, layerwarm_env, leftovers, run_layerwarm
from tests.support.images import Image, Layer, random_tar
from tests.support.registry import RegistryServer
from tests.support.s3 import S3Server


def _name(lay: Layer) -> str:
    return "sha256_" + lay.digest.removeprefix("sha256:")


def _push(registry: RegistryServer, *layers: Layer) -> str:
    repo = f"gc/{uuid.uuid4().hex[:10]}"
    registry.push_image(repo, "1", Image(list(layers)))
    return f"{registry.host}/{repo}:1"


def _warm(ref: str, cache_dir: Path, env: dict[str, str] | None = None) -> None:
    p = run_layerwarm("warm", ref, cache_dir=cache_dir, env=env)
    assert p.returncode == 0, p.stderr


def _gc_json(cache_dir: Path, *args: str, code: int = 0) -> dict:
    p = run_layerwarm("gc", "--json", *args, cache_dir=cache_dir)
    assert p.returncode == code, (p.stdout, p.stderr)
    return json.loads(p.stdout)


def _content_entry(cache_dir: Path, data: bytes, age: float) -> str:
    """A file named like an entry (no row: gc adopts it), last modified `age` seconds ago."""
    name = "sha256_" + hashlib.sha256(b"blob" + data).hexdigest()
    path = cache_dir / name
    path.write_bytes(data)
    os.utime(path, (time.time() - age,) * 2)
    return name


def _hashes_ok(cache_dir: Path, layers: list[Layer]) -> None:
    """Every entry present is one of `layers`, byte for byte (so it hashes to its diff_id)."""
    by_name = {_name(x): x for x in layers}
    for name in entries(cache_dir):
        data = (cache_dir / name).read_bytes()
        assert (
            name in by_name
            and "sha256:" + hashlib.sha256(data).hexdigest() == by_name[name].diff_id
        ), name


def test_gc_evicts_in_lru_order_and_spares_pinned_layers(
    registry: RegistryServer, cache_dir: Path
) -> None:
    a, b, c = (Layer(random_tar(700 + i, 100_000 + 20_000 * i), "gzip") for i in range(3))
    refs = [_push(registry, x) for x in (a, b, c)]
    for ref in refs:  # warmed a, b, c: last used in that order
        _warm(ref, cache_dir)
    _warm(refs[0], cache_dir)  # a disk hit: a becomes the most recently used
    p = run_layerwarm("pin", refs[1], "--ttl", "1h", cache_dir=cache_dir)
    assert p.returncode == 0, p.stderr
    sizes = {x.digest: len(x.tar) for x in (a, b, c)}
    quota = str(sizes[a.digest] + sizes[b.digest] + 10)  # room for a and b, not c

    dry = _gc_json(cache_dir, "--max-size", quota, "--dry-run")
    assert [e["digest"] for e in dry["evicted"]] == [c.digest] and dry["dry_run"]
    assert entries(cache_dir) == {_name(a), _name(b), _name(c)}, "--dry-run changed nothing"

    # LRU order is b (pinned: kept), c (evicted), a; then it is under the quota.
    p = run_layerwarm("gc", "--max-size", quota, cache_dir=cache_dir)
    assert p.returncode == 0, p.stderr
    assert f"evicted {c.digest}" in p.stdout and f"kept {b.digest}" in p.stdout
    assert "pinned" in p.stdout and a.digest not in p.stdout
    assert entries(cache_dir) == {_name(a), _name(b)}
    counters = Metadata(cache_dir / ".meta.db").counters()
    assert counters["evictions"] == 1 and counters["evicted_bytes"] == sizes[c.digest]

    # A quota only the pinned layer exceeds: a goes, b stays, exit 1 says it stayed over.
    got = _gc_json(cache_dir, "--max-size", "1K", code=1)
    assert [e["digest"] for e in got["evicted"]] == [a.digest]
    assert got["skipped"] == [{"digest": b.digest, "size": sizes[b.digest], "reason": "pinned"}]
    assert got["size_before"] == sizes[a.digest] + sizes[b.digest]
    assert got["size_after"] == sizes[b.digest] and not got["under_quota"]
    assert entries(cache_dir) == {_name(b)}
    _hashes_ok(cache_dir, [a, b, c])
    p = run_layerwarm("gc", "--max-size", "1K", cache_dir=cache_dir)
    assert p.returncode == 1 and p.stderr.strip() == (  # in the unit the quota was given in
        f"layerwarm: still {sizes[b.digest] / 1000:.1f} kB, above the quota of 1 kB: what is "
        "left is pinned or in use"), p.stderr

    # The evicted layers come back on the next warm, from the registry.
    _warm(refs[2], cache_dir)
    assert _name(c) in entries(cache_dir)


def test_gc_shows_sizes_in_the_unit_the_quota_was_given_in(cache_dir: Path) -> None:
    old = _content_entry(cache_dir, b"o" * 4000, age=300)
    _content_entry(cache_dir, b"n" * 3000, age=200)
    p = run_layerwarm("gc", "--max-size", "6.5K", "--dry-run", cache_dir=cache_dir)
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines()[-1] == (
        f"cache {cache_dir}: 7 kB before, 3 kB after (quota 6.5 kB); "
        "would evict 1 layer, 4 kB freed"), p.stdout
    digest = old.replace("_", ":", 1)
    assert f"would evict {digest}  4 kB  last used " in p.stdout, p.stdout

    p = run_layerwarm("gc", "--max-size", "6.5KiB", "--dry-run", cache_dir=cache_dir)
    assert p.stdout.splitlines()[-1].endswith(
        ": 6.8 KiB before, 2.9 KiB after (quota 6.5 KiB); would evict 1 layer, 3.9 KiB freed"
    ), p.stdout
    p = run_layerwarm("gc", "--dry-run", cache_dir=cache_dir,
                      env={"LAYERWARM_MAX_CACHE_SIZE": "6000"})
    assert p.stdout.splitlines()[-1].endswith(
        ": 7000 bytes before, 3000 bytes after (quota 6000 bytes); would evict 1 layer, "
        "4000 bytes freed"), p.stdout


def test_gc_counts_a_hard_linked_file_once_and_reconciles_rows(cache_dir: Path) -> None:
    old = _content_entry(cache_dir, b"o" * 4000, age=300)
    shared = _content_entry(cache_dir, b"s" * 3000, age=200)
    link = "sha256_" + "e" * 64  # the same content under another digest: one inode
    os.link(cache_dir / shared, cache_dir / link)
    os.utime(cache_dir / shared, (time.time() - 250,) * 2)
    new = _content_entry(cache_dir, b"n" * 2000, age=10)
    meta = Metadata(cache_dir / ".meta.db")
    ghost = Digest.parse("sha256:" + "a" * 64)  # a row whose file is gone
    meta.record_layer(ghost, ghost, "application/vnd.oci.image.layer.v1.tar", 1, 1, "blob")

    # 9000 bytes on disk (not 12000); room for 6000: evicting `old` is enough.
    got = _gc_json(cache_dir, "--max-size", "6000")
    assert got["size_before"] == 9000 and got["size_after"] == 5000
    assert [(e["digest"], e["freed"]) for e in got["evicted"]] == [
        ("sha256:" + old.removeprefix("sha256_"), 4000)
    ]
    assert got["dropped"] == [str(ghost)] and meta.layer(ghost) is None
    assert len(got["adopted"]) == 4  # every file without a row, rehashed and recorded
    listed = {e["digest"]: e for e in json.loads(run_layerwarm(
        "ls", "--json", cache_dir=cache_dir).stdout)}  # fmt: skip
    assert listed["sha256:" + link.removeprefix("sha256_")]["diff_id"] == (
        "sha256:" + hashlib.sha256(b"s" * 3000).hexdigest()
    )

    # Both names of the shared inode go together, and only the last one frees its bytes.
    got = _gc_json(cache_dir, "--max-size", "2000")
    freed = {e["digest"].removeprefix("sha256:"): e["freed"] for e in got["evicted"]}
    assert sorted(freed.values()) == [0, 3000] and got["freed"] == 3000
    assert {"sha256_" + d for d in freed} == {shared, link}
    assert entries(cache_dir) == {new} and got["size_after"] == 2000


def test_gc_sweeps_old_temp_files_and_skips_locked_ones(cache_dir: Path) -> None:
    disk = DiskTier(cache_dir)
    locked_entry = _content_entry(cache_dir, b"L" * 1000, age=900)
    other = _content_entry(cache_dir, b"M" * 1000, age=800)
    locked = Digest.parse(locked_entry, allow_cache_name=True)
    busy = Digest.parse("sha256:" + "b" * 64)
    files = {
        ".tmp/sha256_" + "1" * 64 + ".x1": 7200,  # a crashed write: swept
        ".staging/sha256_" + "2" * 64 + ".partial": 7200,  # a crashed fetch: swept
        ".staging/" + busy.cache_name + ".partial": 7200,  # old but locked: a fetch runs
        ".tmp/sha256_" + "3" * 64 + ".x2": 60,  # young: kept
        ".tmp/stray": 7200,  # not ours by name, but in .tmp: swept
    }
    for rel, age in files.items():
        path = cache_dir / rel
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"t" * 10)
        os.utime(path, (time.time() - age,) * 2)
    (cache_dir / ".tmp" / "subdir").mkdir()  # never removed: gc removes files only
    with disk.lock(locked), disk.lock(busy):
        got = _gc_json(cache_dir, "--max-size", "1000")
    assert sorted(x["path"] for x in got["swept"]) == sorted(
        [".tmp/sha256_" + "1" * 64 + ".x1", ".staging/sha256_" + "2" * 64 + ".partial",
         ".tmp/stray"]
    )  # fmt: skip
    assert sorted(leftovers(cache_dir)) == sorted(
        [".staging/" + busy.cache_name + ".partial", ".tmp/sha256_" + "3" * 64 + ".x2",
         ".tmp/subdir"]
    )  # fmt: skip
    # The oldest entry is locked (being read): kept and reported; the next one goes.
    assert got["skipped"] == [{"digest": str(locked), "size": 1000, "reason": "locked"}]
    assert [e["digest"] for e in got["evicted"]] == ["sha256:" + other.removeprefix("sha256_")]
    assert entries(cache_dir) == {locked_entry}

    got = _gc_json(cache_dir, "--grace", "30s")  # the fetch is over: its lock is free
    assert sorted(x["path"] for x in got["swept"]) == sorted(
        [".staging/" + busy.cache_name + ".partial", ".tmp/sha256_" + "3" * 64 + ".x2"]
    )


def test_gc_usage_errors_exit_2(cache_dir: Path) -> None:
    for args, message in (
        (("--max-size", "12Q"), "invalid --max-size '12Q'"),
        (("--max-size=-5G",), "invalid --max-size '-5G'"),
        (("--grace", "soon"), "invalid --grace 'soon'"),
        (("--older-than", "1d"), "--older-than applies to the remote tier"),
        (("--remote", "file:///tmp/x"), "gc --remote needs --max-size and/or --older-than"),
    ):
        p = run_layerwarm("gc", *args, cache_dir=cache_dir)
        assert p.returncode == 2 and message in p.stderr, (args, p.stderr)
        assert len(p.stderr.strip().splitlines()) == 1
    p = run_layerwarm("gc", cache_dir=cache_dir, env={"LAYERWARM_MAX_CACHE_SIZE": "lots"})
    assert p.returncode == 2 and "LAYERWARM_MAX_CACHE_SIZE" in p.stderr


def test_automatic_quota_after_a_warm_spares_the_warmed_image(
    registry: RegistryServer, cache_dir: Path
) -> None:
    old = Layer(random_tar(720, 300_000), "gzip")
    new1, new2 = Layer(random_tar(721, 150_000), "zstd"), Layer(random_tar(722, 150_000), "gzip")
    big = Layer(random_tar(723, 700_000), "gzip")
    quota = {"LAYERWARM_MAX_CACHE_SIZE": "500K"}  # high 450 kB, low 400 kB
    _warm(_push(registry, old), cache_dir, quota)
    assert entries(cache_dir) == {_name(old)}  # 300 kB: below the high watermark

    # 600 kB after this warm: gc down to 400 kB; only `old` may go.
    _warm(_push(registry, new1, new2), cache_dir, quota)
    assert entries(cache_dir) == {_name(new1), _name(new2)}
    assert Metadata(cache_dir / ".meta.db").counters()["evictions"] == 1

    # A warm bigger than the quota on its own: everything else goes, its layer stays.
    p = run_layerwarm("warm", _push(registry, big), cache_dir=cache_dir, env=quota)
    assert p.returncode == 0, p.stderr
    assert entries(cache_dir) == {_name(big)}
    assert "above its low watermark" in p.stderr
    _hashes_ok(cache_dir, [old, new1, new2, big])


def test_a_gc_loop_during_a_warm_never_loses_or_corrupts_an_entry(
    registry: RegistryServer, cache_dir: Path
) -> None:
    layers = [Layer(random_tar(740 + i, 150_000), ("gzip", "zstd", "none")[i % 3])
              for i in range(8)]  # fmt: skip
    refs = [_push(registry, *layers[i : i + 3]) for i in range(0, 8, 2)]
    shared = (cache_dir.parent / "shared").as_uri()  # publish reads entries gc may evict
    warm = subprocess.Popen(
        layerwarm_cmd("warm", "--io-threads", "4", "--remote", shared, *refs),
        env=layerwarm_env(cache_dir),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    disk, rounds, evicted = DiskTier(cache_dir), 0, 0
    stop = threading.Event()

    def loop() -> None:
        nonlocal rounds, evicted
        while not stop.is_set():
            evicted += len(gc.collect(disk, 0, grace=0).evicted)  # evict all it can
            rounds += 1

    t = threading.Thread(target=loop)
    t.start()
    try:
        out, err = warm.communicate(timeout=120)
    finally:
        stop.set()
        t.join()
    assert warm.returncode == 0, err
    assert rounds > 1 and evicted > 0, "gc ran and evicted while the warm ran"
    _hashes_ok(cache_dir, layers)  # whatever survived is whole, on disk and remote
    _hashes_ok(cache_dir.parent / "shared", layers)
    # Nothing half-made was named, nor left in .tmp; another warm restores every layer.
    again = run_layerwarm("warm", *refs, cache_dir=cache_dir)
    assert again.returncode == 0, again.stderr
    assert entries(cache_dir) == {_name(x) for x in layers}
    _hashes_ok(cache_dir, layers)
    assert not [x for x in leftovers(cache_dir) if not x.startswith(".staging/")]


# ---------------------------------------------------------------- remote tier


def _seed_remote(upload, tmp_path: Path, count: int, start: int = 0) -> list[tuple[Digest, int]]:
    out = []
    for i in range(start, start + count):
        data = os.urandom(1000 * (i + 1))
        digest = Digest("sha256", hashlib.sha256(data + b"r").hexdigest())
        src = tmp_path / f"src{i}"
        src.write_bytes(data)
        upload(digest, src)
        out.append((digest, len(data)))
    return out


def test_remote_gc_on_a_directory_tier_by_age_and_size(tmp_path: Path, cache_dir: Path) -> None:
    root = tmp_path / "shared"
    tier = DirectoryTier(root)
    seeded = _seed_remote(lambda d, src: tier.upload(d, src, {"diff-id": str(d)}), tmp_path, 4)
    for i, (digest, _) in enumerate(seeded):  # 4, 3, 2 and 1 days old
        os.utime(root / digest.cache_name, (time.time() - (4 - i) * 86400,) * 2)
    (root / "notes.txt").write_text("not a layer")
    (root / ("sha256_" + "c" * 64 + ".bak")).write_text("not a layer either")
    url = root.as_uri()

    p = run_layerwarm("gc", "--remote", url, "--older-than", "2d12h", "--dry-run",
                      cache_dir=cache_dir)  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert f"would evict {seeded[0][0]}" in p.stdout and f"would evict {seeded[1][0]}" in p.stdout
    assert (root / seeded[0][0].cache_name).exists()

    p = run_layerwarm("gc", "--remote", url, "--older-than", "2d12h", cache_dir=cache_dir)
    assert p.returncode == 0, p.stderr
    left = {e.digest for e in tier.list()}
    assert left == {seeded[2][0], seeded[3][0]}
    assert not (root / ".meta" / f"{seeded[0][0].cache_name}.json").exists()

    # By size: the oldest goes first; LAYERWARM_REMOTE names the tier when --remote is bare.
    p = run_layerwarm("gc", "--remote", "--max-size", "4500", "--json", cache_dir=cache_dir,
                      env={"LAYERWARM_REMOTE": url})  # fmt: skip
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout)
    assert [e["digest"] for e in got["evicted"]] == [str(seeded[2][0])]
    assert got["size_before"] == 7000 and got["size_after"] == 4000
    assert {e.digest for e in tier.list()} == {seeded[3][0]}
    assert (root / "notes.txt").exists() and (root / ("sha256_" + "c" * 64 + ".bak")).exists()
    assert Metadata(cache_dir / ".meta.db").counters()["remote_evictions"] == 3


def test_remote_gc_on_s3_deletes_only_layers_below_the_prefix(
    s3: S3Server, tmp_path: Path, cache_dir: Path
) -> None:
    bucket = s3.create_bucket(f"gc-{uuid.uuid4().hex[:10]}")
    client = s3.client()
    tier = S3Tier(bucket, "fleet", client=client)
    first = _seed_remote(lambda d, src: tier.upload(d, src, {}), tmp_path, 1)
    time.sleep(1.1)  # S3 keeps LastModified to the second: make the first one the oldest
    seeded = first + _seed_remote(lambda d, src: tier.upload(d, src, {}), tmp_path, 2, 1)
    # sizes 1000, 2000, 3000
    others = [
        "notes.txt",
        "fleet/readme",
        "fleet/sha256_" + "d" * 64 + ".part",
        "fleet/sub/sha256_" + "e" * 64,
        "other/" + seeded[0][0].cache_name,
    ]
    for key in others:
        client.put_object(Bucket=bucket, Key=key, Body=b"x" * 50_000)
    env = s3.env()

    p = run_layerwarm("gc", "--remote", f"s3://{bucket}/fleet", "--older-than", "1d",
                      "--json", cache_dir=cache_dir, env=env)  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["evicted"] == []  # all younger than a day

    p = run_layerwarm("gc", "--remote", f"s3://{bucket}/fleet", "--max-size", "4K",
                      "--json", cache_dir=cache_dir, env=env)  # fmt: skip
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout)
    assert got["size_before"] == 6000 and got["size_after"] <= 4000
    assert got["evicted"][0]["digest"] == str(seeded[0][0])
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]}
    assert set(others) <= keys, "nothing but layers below the prefix is ever deleted"
    assert {e.digest for e in tier.list()} == {d for d, _ in seeded} - {
        e_digest for e_digest in (Digest.parse(e["digest"]) for e in got["evicted"])
    }


def test_gc_never_deletes_or_reads_outside_the_cache(tmp_path: Path, cache_dir: Path) -> None:
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "data").write_bytes(b"p" * 5000)
    (cache_dir / ("sha256_" + "9" * 64)).symlink_to(outside / "data")
    (cache_dir / ".tmp").mkdir()
    (cache_dir / ".tmp" / "link").symlink_to(outside)
    (cache_dir / ".staging").symlink_to(outside)  # a whole directory swapped for a link
    (cache_dir / "sha256_not-hex").write_bytes(b"n")
    got = _gc_json(cache_dir, "--max-size", "0", "--grace", "0s")
    assert got["adopted"] == []  # a link is never rehashed as an entry
    assert (outside / "data").read_bytes() == b"p" * 5000 and outside.is_dir()
    assert (cache_dir / "sha256_not-hex").exists()  # not an entry name: never touched
    assert not os.path.lexists(cache_dir / ".tmp" / "link")  # the link itself is swept
