"""`layerwarm pin / unpin / pin --list`: pins resolved like `plan` (or, offline, from what a
warm recorded), shown by `ls`, honoured by gc until they expire; and a `.meta.db` made
before the pins table existed keeps working."""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from pathlib import Path

from pipeline.digest import Digest
from pipeline.metadata import Metadata
from tests.support.cli import entries, run_layerwarm
from tests.support.images import Image, Layer, random_tar
from tests.support.proxy import Proxy
from tests.support.registry import RegistryServer


def _name(lay: Layer) -> str:
    return "sha256_" + lay.digest.removeprefix("sha256:")


def _ok(*args: str, cache_dir: Path) -> str:
    p = run_layerwarm(*args, cache_dir=cache_dir)
    assert p.returncode == 0, (args, p.stderr)
    return p.stdout


def test_pin_protects_an_images_layers_until_unpinned(
    registry: RegistryServer, cache_dir: Path
) -> None:
    base, app, other = (Layer(random_tar(800 + i, 90_000), "gzip") for i in range(3))
    repo = f"pin/{uuid.uuid4().hex[:10]}"
    registry.push_image(repo, "app", Image([base, app]))
    registry.push_image(repo, "other", Image([other]))
    app_ref, other_ref = f"{registry.host}/{repo}:app", f"{registry.host}/{repo}:other"
    _ok("warm", app_ref, other_ref, cache_dir=cache_dir)

    before = time.time()
    out = _ok("pin", app_ref, "--ttl", "6h", cache_dir=cache_dir)
    assert f"pinned {app_ref}: 2 layers until " in out

    listed = {e["digest"]: e for e in json.loads(_ok("ls", "--json", cache_dir=cache_dir))}
    assert listed[other.digest]["pinned_until"] is None
    until = listed[base.digest]["pinned_until"]
    assert until == listed[app.digest]["pinned_until"]
    got = time.mktime(time.strptime(until, "%Y-%m-%dT%H:%M:%SZ")) - time.timezone
    assert before + 6 * 3600 - 2 <= got <= time.time() + 6 * 3600 + 1
    table = _ok("ls", cache_dir=cache_dir).splitlines()
    assert table[0].split()[-2:] == ["PINNED", "UNTIL"]
    assert next(x for x in table if base.digest in x).endswith(until)
    assert next(x for x in table if other.digest in x).endswith(" -")

    rows = json.loads(_ok("pin", "--list", "--json", cache_dir=cache_dir))
    assert sorted((r["layer"], r["ref"]) for r in rows) == sorted(
        [(base.digest, app_ref), (app.digest, app_ref)]
    )
    shown = _ok("inspect", base.digest, cache_dir=cache_dir).splitlines()
    assert ["pinned", "until", until] in [x.split() for x in shown]

    # gc with no room: only the pinned layers stay, and it says it could not get under.
    p = run_layerwarm("gc", "--max-size", "0", cache_dir=cache_dir)
    assert p.returncode == 1 and "pinned" in p.stdout and "above the quota" in p.stderr
    assert entries(cache_dir) == {_name(base), _name(app)}

    assert "unpinned" in _ok("unpin", app_ref, cache_dir=cache_dir)
    assert _ok("pin", "--list", cache_dir=cache_dir).strip() == "no pins"
    p = run_layerwarm("unpin", app_ref, cache_dir=cache_dir)
    assert p.returncode == 1 and "not pinned" in p.stderr
    _ok("gc", "--max-size", "0", cache_dir=cache_dir)
    assert entries(cache_dir) == set()


def test_pin_offline_uses_the_layers_a_warm_recorded(
    registry_proxy: Proxy, registry: RegistryServer, cache_dir: Path
) -> None:
    lay = Layer(random_tar(810, 60_000), "zstd")
    repo = f"pin/{uuid.uuid4().hex[:10]}"
    registry.push_image(repo, "1", Image([lay]))
    ref = f"{registry_proxy.host}/{repo}:1"
    never = f"{registry_proxy.host}/{repo}:never-warmed"
    _ok("warm", ref, cache_dir=cache_dir)

    registry_proxy.fail(r"/v2/", status=404, times=None)  # the registry is "gone"
    p = run_layerwarm("pin", ref, never, "--ttl", "1h", cache_dir=cache_dir)
    assert p.returncode == 1  # one of the two could not be pinned
    assert f"pinned {ref}: 1 layer until" in p.stdout and "offline" in p.stdout
    assert never in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert Metadata(cache_dir / ".meta.db").pinned_until().keys() == {lay.digest}


def test_expired_pins_protect_nothing_and_are_dropped(cache_dir: Path) -> None:
    data = b"x" * 5000
    digest = Digest.of_bytes(data + b"k")
    (cache_dir / digest.cache_name).write_bytes(data)
    meta = Metadata(cache_dir / ".meta.db")
    meta.pin([digest], "example.com/a:1", time.time() - 1)
    assert _ok("pin", "--list", cache_dir=cache_dir).strip() == "no pins"
    _ok("gc", "--max-size", "0", cache_dir=cache_dir)
    assert entries(cache_dir) == set()
    assert sqlite3.connect(cache_dir / ".meta.db").execute("SELECT * FROM pins").fetchall() == []


def test_pin_usage_errors_exit_2(cache_dir: Path) -> None:
    for args, message in (
        (("pin", "example.com/a:1"), "pin needs --ttl"),
        (("pin", "example.com/a:1", "--ttl", "forever"), "invalid --ttl 'forever'"),
        (("pin", "Not A Ref", "--ttl", "1h"), "Not A Ref"),
        (("pin", "--list", "example.com/a:1"), "pin --list takes no image references"),
        (("unpin", "bad ref!"), "bad ref!"),
    ):
        p = run_layerwarm(*args, cache_dir=cache_dir)
        assert p.returncode == 2 and message in p.stderr, (args, p.stderr)
    assert not (cache_dir / ".meta.db").exists()


def test_a_meta_db_from_before_pins_keeps_working(cache_dir: Path) -> None:
    data = b"y" * 3000
    digest = Digest.of_bytes(data + b"old")
    (cache_dir / digest.cache_name).write_bytes(data)
    old = sqlite3.connect(cache_dir / ".meta.db")  # the schema as it was, rows and all
    old.executescript(
        """
        CREATE TABLE layers (digest TEXT PRIMARY KEY, diff_id TEXT NOT NULL,
            media_type TEXT NOT NULL, compressed_size INTEGER NOT NULL,
            uncompressed_size INTEGER NOT NULL, created REAL NOT NULL, last_used REAL NOT NULL,
            publish_pending INTEGER NOT NULL DEFAULT 0);
        CREATE TABLE images (manifest_digest TEXT NOT NULL, ref TEXT NOT NULL, platform TEXT,
            layer_digest TEXT NOT NULL, position INTEGER NOT NULL,
            PRIMARY KEY (manifest_digest, ref, layer_digest));
        """
    )
    diff_id = Digest.of_bytes(data)
    old.execute(
        "INSERT INTO layers VALUES (?, ?, 'application/vnd.oci.image.layer.v1.tar', 3000, "
        "3000, 1, 1, 0)",
        (str(digest), str(diff_id)),
    )
    old.commit()
    old.close()
    [e] = json.loads(_ok("ls", "--json", cache_dir=cache_dir))
    assert e["digest"] == str(digest) and e["diff_id"] == str(diff_id)
    assert e["pinned_until"] is None
    assert _ok("pin", "--list", cache_dir=cache_dir).strip() == "no pins"
    got = json.loads(_ok("gc", "--max-size", "1K", "--json", cache_dir=cache_dir))
    assert [x["digest"] for x in got["evicted"]] == [str(digest)]
