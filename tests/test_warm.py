"""`layerwarm warm` and `plan` end to end: the real CLI against a real registry.

Blob requests are counted by a proxy in front of the registry, so "fetched once" and
"no registry request" are measured, not assumed.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import time
import uuid
from collections.abc import Callable
from functools import cached_property
from pathlib import Path

import pytest

from tests.support.cli import entries, layerwarm_cmd, layerwarm_env, leftovers, run_layerwarm
from tests.support.images import ALL_HEADER_FIELDS, Image, Layer, Platform, gzip_member, random_tar
from tests.support.proxy import Proxy
from tests.support.registry import RegistryServer

BLOBS = r"/v2/.+/blobs/sha256:"


def repo() -> str:
    return f"t/{uuid.uuid4().hex[:10]}"


def layer(seed: int, compression: str = "gzip", size: int = 200_000, **kw) -> Layer:
    return Layer(tar=random_tar(seed, size), compression=compression, **kw)


def name(lay: Layer) -> str:
    return "sha256_" + lay.digest.removeprefix("sha256:")


def assert_cached(cache_dir: Path, *layers: Layer) -> None:
    for lay in layers:
        path = cache_dir / name(lay)
        assert path.is_file(), f"{path.name} missing"
        assert path.read_bytes() == lay.tar, f"{path.name} is not the layer's tar"


def test_warm_oci_and_docker_images_with_every_compression(
    registry: RegistryServer, registry_proxy: Proxy, cache_dir: Path
) -> None:
    gz, zst, plain = layer(1, "gzip"), layer(2, "zstd"), layer(3, "none")
    docker_gz = layer(4, "gzip")
    r1, r2 = repo(), repo()
    registry.push_image(r1, "1.0", Image([gz, zst, plain], format="oci"))
    registry.push_image(r2, "2.0", Image([docker_gz, plain], format="docker"))

    p = run_layerwarm(
        "warm", "--json", f"{registry_proxy.host}/{r1}:1.0", f"{registry_proxy.host}/{r2}:2.0",
        cache_dir=cache_dir,
    )
    assert p.returncode == 0, p.stderr
    assert entries(cache_dir) == {name(x) for x in (gz, zst, plain, docker_gz)}
    assert_cached(cache_dir, gz, zst, plain, docker_gz)
    assert leftovers(cache_dir) == []
    result = json.loads(p.stdout)
    assert result["ok"] is True
    assert result["totals"]["from_registry"] == 4  # `plain` is shared: fetched once
    assert {x["source"] for x in result["layers"]} == {"registry"}
    by_digest = {x["digest"]: x for x in result["layers"]}
    assert by_digest[zst.digest]["uncompressed_size"] == len(zst.tar)
    assert by_digest[zst.digest]["diff_id"] == zst.diff_id
    for lay in (gz, zst, plain, docker_gz):
        assert registry_proxy.count("GET", f"/blobs/{lay.digest}") == 1
    assert "fetching layer from registry" in p.stderr
    assert "layer decompressed and cached" in p.stderr

    # Again: everything is a disk hit, no blob leaves the registry.
    registry_proxy.reset()
    p = run_layerwarm("warm", f"{registry_proxy.host}/{r1}:1.0", cache_dir=cache_dir)
    assert p.returncode == 0, p.stderr
    assert registry_proxy.count("GET", BLOBS) == 0  # not even the config: .meta.db keeps it
    assert "disk cache hit" in p.stderr
    assert "3 cache hits" in p.stdout


class HeaderFieldsLayer(Layer):
    """A gzip layer whose two members' headers carry every optional field, header CRC too."""

    @cached_property
    def blob(self) -> bytes:  # type: ignore[override]
        half = len(self.tar) // 2
        return (gzip_member(self.tar[:half], *ALL_HEADER_FIELDS)
                + gzip_member(self.tar[half:], *ALL_HEADER_FIELDS))


def test_gzip_members_with_every_header_field_are_warmed(
    registry: RegistryServer, cache_dir: Path
) -> None:
    """Valid gzip, refused as "corrupt gzip data" while ISA-L got a header in two pieces."""
    lay = HeaderFieldsLayer(random_tar(5, 400_000))
    r = repo()
    registry.push_image(r, "1", Image([lay]))
    p = run_layerwarm("warm", f"{registry.host}/{r}:1", cache_dir=cache_dir)
    assert p.returncode == 0, p.stderr
    assert_cached(cache_dir, lay)
    assert leftovers(cache_dir) == []


def test_second_image_fetches_only_its_own_layers(
    registry: RegistryServer, registry_proxy: Proxy, cache_dir: Path
) -> None:
    base, own_a, own_b = layer(10, size=400_000), layer(11), layer(12, "zstd")
    ra, rb = repo(), repo()
    registry.push_image(ra, "a", Image([base, own_a]))
    registry.push_image(rb, "b", Image([base, own_b], format="docker"))

    p = run_layerwarm("warm", f"{registry_proxy.host}/{ra}:a", cache_dir=cache_dir)
    assert p.returncode == 0, p.stderr
    base_inode = (cache_dir / name(base)).stat().st_ino
    registry_proxy.reset()
    p = run_layerwarm("warm", f"{registry_proxy.host}/{rb}:b", cache_dir=cache_dir)
    assert p.returncode == 0, p.stderr
    layer_gets = [
        h.path for h in registry_proxy.requests_log
        if h.method == "GET" and (base.digest in h.path or own_b.digest in h.path)
    ]
    assert layer_gets == [f"/v2/{rb}/blobs/{own_b.digest}"]
    assert (cache_dir / name(base)).stat().st_ino == base_inode, "shared layer rewritten"
    assert entries(cache_dir) == {name(base), name(own_a), name(own_b)}


def test_warm_again_asks_only_for_manifests_configs_are_kept(
    registry: RegistryServer, registry_proxy: Proxy, cache_dir: Path
) -> None:
    img = Image([layer(13), layer(14, "zstd")])
    r = repo()
    registry.push_image(r, "1", img)
    ref = f"{registry_proxy.host}/{r}:1"
    config_get = ("GET", f"/v2/{r}/blobs/{img.config_digest}")
    assert run_layerwarm("warm", ref, cache_dir=cache_dir).returncode == 0
    assert registry_proxy.count(*config_get) == 1

    registry_proxy.reset()
    p = run_layerwarm("warm", "--json", ref, cache_dir=cache_dir)
    assert p.returncode == 0, p.stderr
    assert [(h.method, h.path) for h in registry_proxy.requests_log] == [
        ("GET", f"/v2/{r}/manifests/1")], "a second warm asked for more than the manifest"
    assert all(x["source"] == "disk" for x in json.loads(p.stdout)["layers"])

    # A stored config that no longer matches its digest is fetched again, not trusted.
    db = sqlite3.connect(cache_dir / ".meta.db")
    db.execute("UPDATE configs SET data = ?", (b'{"rootfs": {"diff_ids": []}}',))
    db.commit()
    db.close()
    registry_proxy.reset()
    p = run_layerwarm("warm", ref, cache_dir=cache_dir)
    assert p.returncode == 0, p.stderr
    assert "does not match its digest" in p.stderr
    assert registry_proxy.count(*config_get) == 1


def test_index_resolves_to_the_platform_asked(
    registry: RegistryServer, cache_dir: Path, tmp_path: Path
) -> None:
    amd, arm = layer(20), layer(21)
    r = repo()
    registry.push_index(r, "multi", [
        Image([amd], platform=Platform("linux", "amd64")),
        Image([arm], platform=Platform("linux", "arm64", "v8")),
    ])
    ref = f"{registry.host}/{r}:multi"

    p = run_layerwarm("warm", "--platform", "linux/arm64", ref, cache_dir=cache_dir)
    assert p.returncode == 0, p.stderr
    assert entries(cache_dir) == {name(arm)}

    both = tmp_path / "both"
    p = run_layerwarm("warm", "--all-platforms", "--json", ref, cache_dir=both)
    assert p.returncode == 0, p.stderr
    assert entries(both) == {name(amd), name(arm)}
    platforms = {img["platform"] for img in json.loads(p.stdout)["images"]}
    assert platforms == {"linux/amd64", "linux/arm64/v8"}

    p = run_layerwarm("warm", "--platform", "linux/s390x", ref, cache_dir=tmp_path / "none")
    assert p.returncode == 1
    assert "no manifest for platform linux/s390x" in p.stderr
    assert entries(tmp_path / "none") == set()


def test_pinned_digest_reference(registry: RegistryServer, cache_dir: Path) -> None:
    lay = layer(25)
    r = repo()
    digest = registry.push_image(r, "x", Image([lay]))
    p = run_layerwarm("warm", f"{registry.host}/{r}@{digest}", cache_dir=cache_dir)
    assert p.returncode == 0, p.stderr
    assert_cached(cache_dir, lay)


def test_flipped_byte_caches_nothing_and_names_both_digests(
    registry: RegistryServer, registry_proxy: Proxy, cache_dir: Path
) -> None:
    good, bad = layer(30), layer(31, size=300_000)
    r = repo()
    registry.push_image(r, "1", Image([good, bad]))
    registry_proxy.flip_byte(f"/blobs/{bad.digest}", offset=1000)

    p = run_layerwarm("warm", f"{registry_proxy.host}/{r}:1", cache_dir=cache_dir)
    assert p.returncode == 1
    line = next(x for x in p.stderr.splitlines() if x.startswith(f"error: layer {bad.digest}"))
    assert "digest mismatch" in line and f"expected {bad.digest}, got sha256:" in line
    assert entries(cache_dir) == {name(good)}  # the good layer is unaffected
    assert leftovers(cache_dir) == []
    assert registry_proxy.count("GET", f"/blobs/{bad.digest}") == 1, "not retried: permanent"


def test_diff_id_mismatch_caches_nothing(registry: RegistryServer, cache_dir: Path) -> None:
    lying = layer(32, "zstd", override_diff_id="sha256:" + "0" * 64)
    r = repo()
    registry.push_image(r, "1", Image([lying]))
    p = run_layerwarm("warm", f"{registry.host}/{r}:1", cache_dir=cache_dir)
    assert p.returncode == 1
    [line] = [x for x in p.stderr.splitlines() if x.startswith("error:")]
    assert line.startswith(f"error: layer {lying.digest}: decompressed content is "), line
    assert line.count(lying.digest) == 1, line  # named once, not once per wrapper
    [logged] = [x for x in p.stderr.splitlines() if "layer failed:" in x]
    assert logged.count(lying.digest) == 1, logged
    assert f"decompressed content is {lying.diff_id}" in line
    assert "diff_id sha256:" + "0" * 64 in line
    assert entries(cache_dir) == set() and leftovers(cache_dir) == []


def test_hostile_layer_digest_is_rejected_before_any_path(
    registry: RegistryServer, registry_proxy: Proxy, tmp_path: Path
) -> None:
    cache_dir = tmp_path / "deep" / "cache"
    honest = layer(33)
    image = Image([honest])
    r = repo()
    registry.push_image(r, "1", image)
    hostile = json.loads(image.manifest_bytes())
    hostile["layers"][0]["digest"] = "sha256:../../x"
    registry_proxy.override(
        f"/v2/{r}/manifests/1", 200, json.dumps(hostile).encode(),
        {"Content-Type": image.manifest_media_type},
    )
    before = set(tmp_path.rglob("*"))
    p = run_layerwarm("warm", f"{registry_proxy.host}/{r}:1", cache_dir=cache_dir)
    assert p.returncode == 1
    assert "invalid digest 'sha256:../../x'" in p.stderr
    assert registry_proxy.count("GET", BLOBS) == 0
    assert entries(cache_dir) == set()
    assert not list(tmp_path.rglob("x")), "something was written outside the cache"
    assert {p for p in tmp_path.rglob("*") if cache_dir not in p.parents and p != cache_dir} \
        <= before | {tmp_path / "deep", tmp_path / "no-docker-config"}


def test_unknown_media_type_fails_that_layer_only(
    registry: RegistryServer, registry_proxy: Proxy, cache_dir: Path
) -> None:
    normal = layer(34)
    weird = layer(35, override_media_type="application/vnd.example.layer.v1.tar+lz4")
    r = repo()
    registry.push_image(r, "1", Image([normal, weird]))
    p = run_layerwarm("warm", f"{registry_proxy.host}/{r}:1", cache_dir=cache_dir)
    assert p.returncode == 1
    assert (
        f"error: layer {weird.digest}: unsupported media type "
        "'application/vnd.example.layer.v1.tar+lz4'" in p.stderr
    )
    assert entries(cache_dir) == {name(normal)}
    assert registry_proxy.count("GET", f"/blobs/{weird.digest}") == 0, "fetched an unusable layer"


def test_two_processes_on_one_host_fetch_each_layer_once(
    registry: RegistryServer, registry_proxy: Proxy, cache_dir: Path
) -> None:
    layers = [layer(40, size=6_000_000), layer(41, "zstd", size=3_000_000), layer(42, "none")]
    r = repo()
    registry.push_image(r, "1", Image(layers))
    cmd = layerwarm_cmd("warm", f"{registry_proxy.host}/{r}:1")
    env = layerwarm_env(cache_dir)
    procs = [
        subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    for lay in layers:
        assert registry_proxy.count("GET", f"/blobs/{lay.digest}") == 1, lay.digest
    assert_cached(cache_dir, *layers)
    combined = outs[0][1] + outs[1][1]
    assert combined.count("disk cache hit") == 3  # the loser of each race finds it on disk


def _warm_holding(
    proxy: Proxy, cache_dir: Path, refs: list[str], held_repo: str, what: str,
    done: Callable[[], bool],
) -> tuple[dict, str]:
    """`warm --json REFS` with `held_repo`'s manifest held until `done()` (what the test
    wants to see happen meanwhile; fails naming `what` if the warm ends first or a minute
    passes); the report and stderr of a warm that succeeded."""
    hold = proxy.hold(f"/v2/{held_repo}/manifests/", 1 << 20)  # all of it, until released
    proc = subprocess.Popen(layerwarm_cmd("warm", "--json", *refs), env=layerwarm_env(cache_dir),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        hold.wait()
        deadline = time.monotonic() + 60
        while not done():
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"{what} did not happen while {held_repo} was held: "
                            f"{proc.communicate()[1][-2000:]}")
            time.sleep(0.05)
    finally:
        hold.release()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    return json.loads(out), err


def test_layers_start_while_other_refs_still_resolve(
    registry: RegistryServer, registry_proxy: Proxy, cache_dir: Path
) -> None:
    """The first image's layer is fetched and cached while the second ref's manifest is
    held (runner._EarlyStarts): a fleet's blobs do not wait for its last manifest."""
    first, second = layer(60, size=300_000), layer(61)
    ra, rb = repo(), repo()
    registry.push_image(ra, "1", Image([first]))
    registry.push_image(rb, "1", Image([second]))
    report, _ = _warm_holding(
        registry_proxy, cache_dir, [f"{registry_proxy.host}/{r}:1" for r in (ra, rb)], rb,
        "the first image's layer cached", (cache_dir / name(first)).is_file)
    assert report["totals"]["from_registry"] == 2
    assert registry_proxy.count("GET", f"/blobs/{first.digest}") == 1
    assert_cached(cache_dir, first, second)


def test_a_blob_missing_from_the_first_repository_comes_from_one_that_resolves_later(
    registry: RegistryServer, registry_proxy: Proxy, cache_dir: Path
) -> None:
    """A layer started early (its first image resolved) that its repository does not
    have is fetched again once the plan is whole, from another repository listing it."""
    shared = layer(62)
    ra, rb = repo(), repo()
    registry.push_image(ra, "1", Image([shared]))
    registry.push_image(rb, "1", Image([shared]))
    registry_proxy.fail(f"/v2/{ra}/blobs/{shared.digest}", 404, times=None)
    report, err = _warm_holding(
        registry_proxy, cache_dir, [f"{registry_proxy.host}/{r}:1" for r in (ra, rb)], rb,
        "the early fetch from the first repository",
        lambda: registry_proxy.finished("GET", f"/v2/{ra}/blobs/{shared.digest}") >= 1)
    assert "layer failed" not in err
    assert registry_proxy.count("GET", f"/v2/{rb}/blobs/{shared.digest}") == 1
    assert report["totals"]["from_registry"] == 1
    assert_cached(cache_dir, shared)


def test_the_first_ref_decides_a_layers_diff_id_whichever_resolves_first(
    registry: RegistryServer, registry_proxy: Proxy, cache_dir: Path
) -> None:
    """Two images list one blob with different diff_ids; the first ref's is the layer's
    (as before layers started early). Here the other image resolves first and its early
    start fails verification: the layer is made again as the first ref describes it, and
    no failure is reported for it."""
    honest = layer(63)
    lying = Layer(honest.tar, "gzip", override_diff_id="sha256:" + "0" * 64)
    assert lying.digest == honest.digest
    ra, rb = repo(), repo()
    registry.push_image(ra, "1", Image([honest]))
    registry.push_image(rb, "1", Image([lying]))
    report, err = _warm_holding(
        registry_proxy, cache_dir, [f"{registry_proxy.host}/{r}:1" for r in (ra, rb)], ra,
        "the early fetch from the second ref's repository",
        lambda: registry_proxy.finished("GET", f"/v2/{rb}/blobs/{honest.digest}") >= 1)
    assert "layer failed" not in err
    assert [x["diff_id"] for x in report["layers"]] == [honest.diff_id]
    assert_cached(cache_dir, honest)
    assert leftovers(cache_dir) == []


def test_plan_reports_tiers_and_changes_nothing(
    registry: RegistryServer, registry_proxy: Proxy, tmp_path: Path
) -> None:
    a, b, shared = layer(50), layer(51), layer(52)
    ra, rb = repo(), repo()
    registry.push_image(ra, "1", Image([shared, a]))
    registry.push_image(rb, "1", Image([shared, b]))
    refs = [f"{registry_proxy.host}/{ra}:1", f"{registry_proxy.host}/{rb}:1"]
    cache_dir = tmp_path / "cache"

    p = run_layerwarm("plan", "--json", *refs, cache_dir=cache_dir)
    assert p.returncode == 0, p.stderr
    plan = json.loads(p.stdout)
    assert [x["digest"] for x in plan["layers"]] == [shared.digest, a.digest, b.digest]
    assert {x["tier"] for x in plan["layers"]} == {None}
    assert plan["bytes_to_fetch"] == shared.size + a.size + b.size
    assert not cache_dir.exists(), "plan must not create or change the cache"
    for lay in (a, b, shared):
        assert registry_proxy.count("GET", f"/blobs/{lay.digest}") == 0

    assert run_layerwarm("warm", refs[0], cache_dir=cache_dir).returncode == 0
    p = run_layerwarm("plan", *refs, cache_dir=cache_dir)
    assert p.returncode == 0
    assert "2 images, 3 unique layers" in p.stdout
    assert "to fetch from registry: 1 layer" in p.stdout


def test_refs_from_file_with_comments(registry: RegistryServer, tmp_path: Path) -> None:
    one, two = layer(60), layer(61)
    r1, r2 = repo(), repo()
    registry.push_image(r1, "1", Image([one]))
    registry.push_image(r2, "1", Image([two]))
    fleet = tmp_path / "images.txt"
    fleet.write_text(
        f"# the fleet\n{registry.host}/{r1}:1   # app\n\n  {registry.host}/{r2}:1\n"
    )
    cache_dir = tmp_path / "cache"
    p = run_layerwarm("warm", "-f", str(fleet), cache_dir=cache_dir)
    assert p.returncode == 0, p.stderr
    assert_cached(cache_dir, one, two)


@pytest.mark.parametrize(
    "args, message",
    [
        (["warm", "Bad/Name"], "repository name must be lowercase"),
        (["warm", "app@sha256:../../etc"], "invalid digest"),
        (["warm"], "no image references given"),
        (["warm", "--platform", "linux", "alpine"], "invalid platform 'linux'"),
        (["warm", "--remote", "ftp://x/y", "alpine"], "ftp://x/y"),
        (["warm", "-f", "/nonexistent/images.txt"], "cannot read /nonexistent/images.txt"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_usage_errors_exit_2_with_one_clear_line(args, message, tmp_path: Path) -> None:
    p = run_layerwarm(*args, cache_dir=tmp_path / "cache")
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert message in p.stderr
    assert "Traceback" not in p.stderr
    assert not (tmp_path / "cache").exists()


def test_bad_line_in_file_is_named(tmp_path: Path) -> None:
    fleet = tmp_path / "images.txt"
    fleet.write_text("alpine\nNOT VALID\n")
    p = run_layerwarm("warm", "-f", str(fleet), cache_dir=tmp_path / "cache")
    assert p.returncode == 2
    assert f"{fleet}:2: invalid image reference" in p.stderr


def test_missing_image_is_a_failure_not_a_crash(registry: RegistryServer, cache_dir: Path) -> None:
    p = run_layerwarm("warm", f"{registry.host}/{repo()}:nope", cache_dir=cache_dir)
    assert p.returncode == 1
    assert "not found" in p.stderr and "Traceback" not in p.stderr


def test_htpasswd_registry_through_docker_config(
    auth_registry: RegistryServer, docker_config: Path, tmp_path: Path
) -> None:
    lay = layer(80, "zstd")
    r = repo()
    auth_registry.push_image(r, "1", Image([lay]))
    ref = f"{auth_registry.host}/{r}:1"

    denied = run_layerwarm("warm", ref, cache_dir=tmp_path / "denied")
    assert denied.returncode == 1
    assert "asks for a login and there are no credentials" in denied.stderr
    assert entries(tmp_path / "denied") == set()

    p = run_layerwarm(
        "warm", ref, cache_dir=tmp_path / "ok", env={"DOCKER_CONFIG": str(docker_config)}
    )
    assert p.returncode == 0, p.stderr
    assert_cached(tmp_path / "ok", lay)
    assert "s3cret-pw" not in p.stderr + p.stdout


def test_fleet_file_asks_each_unique_document_once(
    registry: RegistryServer, registry_proxy: Proxy, tmp_path: Path
) -> None:
    # 500 lines over 3 repositories and 25 tags, all tags of a repo naming one index whose
    # children and configs are shared: each unique ref, manifest and config is asked once.
    base = layer(90)
    images = [Image([base, layer(91)], platform=Platform("linux", "amd64")),
              Image([base, layer(92)], platform=Platform("linux", "arm64"))]
    repos = [repo() for _ in range(3)]
    tags = [f"v{i}" for i in range(25)]
    for r in repos:
        for t in tags:
            registry.push_index(r, t, images)
    lines = [f"{registry_proxy.host}/{repos[i % 3]}:{tags[i % 25]}" for i in range(500)]
    fleet = tmp_path / "fleet.txt"
    fleet.write_text("\n".join(lines) + "\n")

    p = run_layerwarm("plan", "--json", "-f", str(fleet), cache_dir=tmp_path / "cache")
    assert p.returncode == 0, p.stderr
    plan = json.loads(p.stdout)
    assert len(plan["images"]) == 75 and len(plan["layers"]) == 2
    tag_gets = registry_proxy.count("GET", r"/manifests/v\d+$")
    child_gets = registry_proxy.count("GET", r"/manifests/sha256:")
    config_gets = registry_proxy.count("GET", r"/blobs/sha256:")
    assert tag_gets == 75, "one request per unique reference"
    assert child_gets == 1, "the amd64 child manifest is the same document in every repo"
    assert config_gets == 1, "one image config, asked once"
