"""A corpus of hostile inputs: references, manifests, configs, layer blobs, redirects, auth
challenges and server errors, each run through the real CLI against a real registry.

Every case is a small setup function in a table: it pushes what it needs (or serves a
forged document through the fault proxy) and returns a `Scenario`: the arguments, the exit
code, and a pattern the error line must match. `_play` runs it in a sandbox and checks the
invariants every hostile run must keep (tests/support/hostile.py): the exit code in
bounded time, no traceback, one-line errors that name what is wrong, no raw control
characters, nothing cached for the hostile layer and no leftovers, every cache name a
well-formed digest name, nothing written outside the cache dir.

Hostile names carry MARK, so a file they might have created is looked for by name. The
few cases that mostly wait (retry backoff, a hang cut by its timeout) run in the
background beside the rest; see "slow cases" at the end.

Cases that fail here are product bugs to fix, not tests to relax: nothing is xfail.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from tests.support.cli import entries
from tests.support.hostile import (
    Run,
    Sandbox,
    check_failure,
    check_success,
    escape_targets,
)
from tests.support.images import (
    OCI_CONFIG,
    OCI_INDEX,
    OCI_MANIFEST,
    Dir,
    File,
    Hardlink,
    Image,
    Layer,
    Platform,
    Symlink,
    canonical_json,
    compress,
    make_index,
    make_tar,
    random_tar,
    sha256_digest,
)
from tests.support.proxy import Proxy
from tests.support.registry import RegistryServer

MARK = uuid.uuid4().hex[:8]
ESCAPE = f"../../lw-escape-{MARK}"
HEX = "ab" * 32
GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
JSON_HEADERS = {"Content-Type": "application/json"}
HTML_HEADERS = {"Content-Type": "text/html; charset=utf-8"}
HTML_PAGE = (b"<!DOCTYPE html>\n<html>\n<head><title>Oops</title></head>\n"
             b"<body>\n<h1>Something broke</h1>\n<p>error: not a layerwarm line</p>\n"
             b"</body>\n</html>\n")
PLATFORM = ("--platform", "linux/amd64")


def _repo() -> str:
    return f"hostile/{uuid.uuid4().hex[:10]}"


def _name(digest: str) -> str:
    return "sha256_" + digest.removeprefix("sha256:")


# ------------------------------------------------------------------ the harness


@dataclass(frozen=True)
class Honest:
    """One honest single-layer image, pushed once for the module; forged documents are
    derived from it and served in its place by the proxy."""

    repo: str
    tag: str
    image: Image
    layer: Layer

    @property
    def manifest(self) -> dict[str, Any]:
        return json.loads(self.image.manifest_bytes())

    @property
    def manifest_path(self) -> str:
        return rf"^/v2/{re.escape(self.repo)}/manifests/{self.tag}$"

    @property
    def blob_path(self) -> str:
        return rf"/blobs/{self.layer.digest}$"

    @property
    def config_path(self) -> str:
        return rf"/blobs/{self.image.config_digest}$"

    def ref(self, proxy: Proxy) -> str:
        return f"{proxy.host}/{self.repo}:{self.tag}"


@pytest.fixture(scope="module")
def honest(registry: RegistryServer) -> Honest:
    lay = Layer(random_tar(7001, 20_000), "gzip")
    image = Image([lay])
    repo = _repo()
    registry.push_image(repo, "1", image)
    return Honest(repo, "1", image, lay)


@dataclass
class Ctx:
    registry: RegistryServer
    proxy: Proxy
    box: Sandbox
    honest: Honest


@dataclass
class Scenario:
    args: list[str]
    expect: str                    # regex every `error:` / `layerwarm:` line must match
    code: int = 1
    env: dict[str, str] = field(default_factory=dict)
    hostile: list[str] = field(default_factory=list)   # layer digests never cached
    allowed: list[str] = field(default_factory=list)   # cache entries that may exist
    never: list[str] = field(default_factory=list)     # path regexes the proxy never sees
    most: tuple[str, int] | None = None                # (path regex, most requests)
    watch: list[Path] = field(default_factory=list)    # paths that must not appear
    timeout: float = 60.0
    max_seconds: float | None = None


Setup = Callable[[Ctx], Scenario]


@pytest.fixture(scope="module")
def proxy(registry: RegistryServer) -> Iterator[Proxy]:
    """One proxy for the module (starting and stopping one per case costs more than the
    case); `ctx` clears its rules and log before every test."""
    with Proxy(registry.url) as p:
        yield p


@pytest.fixture
def ctx(registry: RegistryServer, proxy: Proxy, tmp_path: Path, honest: Honest) -> Ctx:
    _ = proxy.requests_log  # waits for requests still in flight from the case before
    proxy.clear_rules()
    proxy.reset()
    return Ctx(registry, proxy, Sandbox(tmp_path), honest)


def _check(ctx: Ctx, sc: Scenario, run: Run, before: dict[str, str]) -> None:
    watch = [*sc.watch, *escape_targets(ctx.box, ESCAPE)]
    allowed = [_name(d) for d in sc.allowed]
    check_failure(ctx.box, run, before, code=sc.code, expect=sc.expect, hostile=sc.hostile,
                  allowed=allowed, watch=watch)
    if sc.code == 2:
        assert not ctx.box.cache.exists(), "a usage error created the cache dir"
        assert ctx.proxy.requests_log == [], "a usage error reached the registry"
    for path in sc.never:
        hits = ctx.proxy.count(None, path)
        assert hits == 0, f"{hits} request(s) for {path} (must never be asked)\n{run.show()}"
    if sc.most is not None:
        path, most = sc.most
        hits = ctx.proxy.count(None, path)
        assert hits <= most, f"{hits} requests for {path}, at most {most} expected"
    if sc.max_seconds is not None:
        assert run.seconds <= sc.max_seconds, f"took {run.seconds:.1f}s\n{run.show()}"


def _play(ctx: Ctx, setup: Setup) -> None:
    sc = setup(ctx)
    run, before = ctx.box.run(*sc.args, env=sc.env, timeout=sc.timeout)
    _check(ctx, sc, run, before)


def _cases(*pairs: tuple[str, Setup]) -> list[Any]:
    return [pytest.param(setup, id=name) for name, setup in pairs]


# ------------------------------------------------------------------ 1. references

REG = "{reg}"  # replaced by the proxy: a reference that slips through reaches a counted server


def refs(*args: str, expect: str, file: bytes | None = None) -> Setup:
    """`warm ARGS` (and `-f refs.txt` holding `file`) must be a one-line usage error."""

    def setup(ctx: Ctx) -> Scenario:
        argv = ["warm", *(a.replace(REG, ctx.proxy.host) for a in args)]
        if file is not None:
            path = ctx.box.root / "refs.txt"
            path.write_bytes(file.replace(REG.encode(), ctx.proxy.host.encode()))
            argv += ["-f", str(path)]
        return Scenario(argv, rf"^layerwarm: .*{expect}", code=2)

    return setup


REFERENCES = _cases(
    ("empty", refs("", expect=r"argument: empty image reference$")),
    ("uppercase-repo", refs(f"{REG}/Team/App:1", expect=r"must be lowercase")),
    ("dotdot-component", refs(f"{REG}/../etc/passwd",
                              expect=r"invalid repository path component '\.\.'")),
    ("a-dotdot-b", refs("a/../b", expect=r"invalid repository path component '\.\.'")),
    ("overlong-name", refs(f"{REG}/{'a' * 300}", expect=r"longer than 255 characters")),
    ("overlong-tag", refs(f"{REG}/x:{'t' * 129}", expect=r"invalid tag")),
    ("tag-shell-chars", refs(f"{REG}/x:v1$(reboot)", expect=r"invalid tag")),
    ("digest-traversal", refs(f"{REG}/x@sha256:{ESCAPE}", expect=r"invalid digest")),
    ("digest-md5", refs(f"{REG}/x@md5:d41d8cd98f00b204e9800998ecf8427e",
                        expect=r"invalid digest")),
    ("digest-63-hex", refs(f"{REG}/x@sha256:{HEX[:63]}", expect=r"invalid sha256 digest")),
    ("digest-uppercase-hex", refs(f"{REG}/x@sha256:{HEX.upper()}", expect=r"invalid digest")),
    ("digest-cache-name-form", refs(f"{REG}/x@sha256_{HEX}", expect=r"invalid digest")),
    ("newline-forges-a-line", refs(f"{REG}/x\nerror: forged", expect=r"contains whitespace")),
    ("terminal-escape", refs(f"{REG}/x\x1b[2J", expect=r"invalid repository path component")),
    ("nul-in-file", refs(file=b"# images\n{reg}/x\x00y\n",
                         expect=r"refs\.txt:2: invalid image reference")),
    ("port-over-65535", refs("127.0.0.1:99999/x", expect=r"invalid registry host|port")),
    ("port-not-numeric", refs("127.0.0.1:http/x", expect=r"invalid registry host")),
    ("https-url", refs("https://registry.example/x", expect=r"invalid registry host")),
    ("file-url", refs("file:///etc/passwd", expect=r"invalid registry host")),
    ("cyrillic-repo", refs(f"{REG}/\u0430lpine", expect=r"invalid repository path component")),
    ("cyrillic-host", refs("r\u0435gistry.example/x", expect=r"invalid registry host")),
    ("cyrillic-tag", refs(f"{REG}/alpine:l\u0430test", expect=r"invalid tag")),
    ("file-bad-line-3", refs(file=b"{reg}/ok:1\n# comment\n{reg}/Bad:1\n",
                             expect=r"refs\.txt:3: invalid image reference")),
    ("file-not-utf8", refs(file=b"{reg}/ok:1\n\xff\xfe\xfd\n",
                           expect=r"refs\.txt.*(UTF-8|utf-8|decode)")),
    ("file-record-separator", refs(file=b"{reg}/a:1\x1e{reg}/b:1\n",
                                   expect=r"refs\.txt:1: invalid image reference")),
)


@pytest.mark.parametrize("setup", REFERENCES)
def test_hostile_reference(ctx: Ctx, setup: Setup) -> None:
    _play(ctx, setup)


# ------------------------------------------------------------------ 2/3. manifests

DELETE = object()
Doc = Callable[[dict[str, Any]], Any]  # honest manifest -> forged document (JSON or bytes)


def _edit(*where: str | int, **fields: Any) -> Doc:
    """Set (or DELETE) `fields` in the object at `where` inside a copy of the manifest."""

    def make(manifest: dict[str, Any]) -> Any:
        doc = json.loads(json.dumps(manifest))
        obj = doc
        for key in where:
            obj = obj[key]
        for key, value in fields.items():
            if value is DELETE:
                obj.pop(key, None)
            else:
                obj[key] = value
        return doc

    return make


def layer0(**fields: Any) -> Doc:
    return _edit("layers", 0, **fields)


def config(**fields: Any) -> Doc:
    return _edit("config", **fields)


def index_of(**entry: Any) -> Doc:
    """An index with one entry; `entry` overrides the entry's fields."""

    def make(manifest: dict[str, Any]) -> Any:
        body = canonical_json(manifest)
        item = {"mediaType": OCI_MANIFEST, "digest": sha256_digest(body), "size": len(body),
                "platform": {"os": "linux", "architecture": "amd64"}, **entry}
        return {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [item]}

    return make


def served(doc: Doc, expect: str, content_type: str = OCI_MANIFEST, *,
           blobs_ok: bool = False) -> Setup:
    """The honest tag answers with the forged document; unless `blobs_ok`, no blob (not even
    the config) may be asked for: the document must be refused before anything is fetched."""

    def setup(ctx: Ctx) -> Scenario:
        forged = doc(ctx.honest.manifest)
        body = forged if isinstance(forged, bytes) else json.dumps(forged).encode()
        ctx.proxy.override(ctx.honest.manifest_path, 200, body, {"Content-Type": content_type})
        never = [ctx.honest.blob_path] if blobs_ok else [r"/blobs/"]
        return Scenario(["warm", *PLATFORM, ctx.honest.ref(ctx.proxy)], expect,
                        hostile=[ctx.honest.layer.digest], never=never)

    return setup


DIGESTS = _cases(
    ("layer-traversal", served(layer0(digest=f"sha256:{ESCAPE}"),
                               r"manifest layer 0: invalid digest")),
    ("layer-63-hex", served(layer0(digest=f"sha256:{HEX[:63]}"),
                            r"manifest layer 0: invalid sha256 digest")),
    ("layer-sha512-short", served(layer0(digest=f"sha512:{HEX}"),
                                  r"manifest layer 0: invalid sha512 digest")),
    ("layer-uppercase-algorithm", served(layer0(digest=f"SHA256:{HEX}"),
                                         r"manifest layer 0: invalid digest")),
    ("layer-with-slash", served(layer0(digest=f"sha256:{HEX[:32]}/{HEX[33:]}"),
                                r"manifest layer 0: invalid digest")),
    ("layer-null", served(layer0(digest=None), r"manifest layer 0: digest must be a string")),
    ("layer-number", served(layer0(digest=12345),
                            r"manifest layer 0: digest must be a string, got int")),
    ("layer-cache-name-form", served(layer0(digest=f"sha256_{HEX}"),
                                     r"manifest layer 0: invalid digest")),
    ("layer-trailing-newline", served(layer0(digest=f"sha256:{HEX}\n"),
                                      r"manifest layer 0: invalid digest")),
    ("config-traversal", served(config(digest=f"sha256:{ESCAPE}"),
                                r"manifest config: invalid digest")),
    ("config-number", served(config(digest=7), r"manifest config: digest must be a string")),
    ("index-entry-traversal", served(index_of(digest=f"sha256:{ESCAPE}"),
                                     r"index entry 0: invalid digest", OCI_INDEX)),
)


@pytest.mark.parametrize("setup", DIGESTS)
def test_hostile_digest_in_manifest(ctx: Ctx, setup: Setup) -> None:
    _play(ctx, setup)


def index_child_is_index(ctx: Ctx) -> Scenario:
    """An index entry that says 'image manifest' but whose digest names another index."""
    repo = _repo()
    inner = [Image([ctx.honest.layer], platform=Platform("linux", "amd64"))]
    ctx.registry.push_index(repo, "inner", inner)
    data, media_type, digest = make_index(inner)
    ctx.registry.push_manifest(repo, digest, data, media_type)
    outer = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {"mediaType": OCI_MANIFEST, "digest": digest, "size": len(data),
         "platform": {"os": "linux", "architecture": "amd64"}}]}
    ctx.proxy.override(rf"^/v2/{re.escape(repo)}/manifests/outer$", 200,
                       json.dumps(outer).encode(), {"Content-Type": OCI_INDEX})
    return Scenario(["warm", *PLATFORM, f"{ctx.proxy.host}/{repo}:outer"],
                    r"is not an image manifest", never=[r"/blobs/"])


def index_without_platform(ctx: Ctx) -> Scenario:
    repo = _repo()
    ctx.registry.push_index(repo, "multi", [
        Image([ctx.honest.layer], platform=Platform("linux", "arm64"))])
    return Scenario(["warm", "--platform", "linux/s390x", f"{ctx.proxy.host}/{repo}:multi"],
                    r"no manifest for platform linux/s390x \(index offers: linux/arm64\)",
                    never=[r"/blobs/"])


def by_digest_body_altered(ctx: Ctx) -> Scenario:
    """A pinned reference whose manifest comes back with other bytes."""
    digest = ctx.honest.image.manifest_digest
    forged = json.dumps(layer0(size=ctx.honest.layer.size + 1)(ctx.honest.manifest)).encode()
    ctx.proxy.override(rf"/manifests/{digest}$", 200, forged, {"Content-Type": OCI_MANIFEST})
    return Scenario(["warm", f"{ctx.proxy.host}/{ctx.honest.repo}@{digest}"],
                    rf"manifest {digest} from .*expected {digest}, got sha256:",
                    never=[r"/blobs/"])


def digest_header(value: str, expect: str) -> Setup:
    """The tag answers with the honest body, but a Docker-Content-Digest header of `value`."""

    def setup(ctx: Ctx) -> Scenario:
        ctx.proxy.override(ctx.honest.manifest_path, 200, ctx.honest.image.manifest_bytes(),
                           {"Content-Type": OCI_MANIFEST, "Docker-Content-Digest": value})
        return Scenario(["warm", ctx.honest.ref(ctx.proxy)], expect, never=[r"/blobs/"])

    return setup


MANIFESTS = _cases(
    ("not-json", served(lambda m: HTML_PAGE, r"manifest is not valid JSON")),
    ("json-array", served(lambda m: [m], r"manifest is not a JSON object")),
    ("larger-than-4MiB", served(_edit(annotations={"pad": "x" * (4 << 20)}),
                                r"larger than 4194304 bytes")),
    ("schema-version-1", served(lambda m: {"schemaVersion": 1, "name": "x", "fsLayers": []},
                                r"Docker schema 1")),
    ("unknown-media-type", served(lambda m: {"schemaVersion": 2, "mediaType": "application/x-ev"},
                                  r"unsupported media type: manifest 'application/x-ev'")),
    ("layers-not-a-list", served(_edit(layers={"0": "a"}), r"'layers' is not a list")),
    ("layer-not-an-object", served(_edit(layers=[f"sha256:{HEX}"]),
                                   r"manifest layer 0: descriptor is not an object")),
    ("size-negative", served(layer0(size=-1), r"manifest layer 0: size -1 is not a non-neg")),
    ("size-string", served(layer0(size="20000"), r"manifest layer 0: size '20000' is not")),
    ("size-bool", served(layer0(size=True), r"manifest layer 0: size True is not")),
    ("size-float", served(layer0(size=1.5), r"manifest layer 0: size 1\.5 is not")),
    ("config-missing", served(_edit(config=DELETE),
                              r"manifest config: descriptor is not an object")),
    ("1025-layers", served(lambda m: {**m, "layers": m["layers"] * 1025},
                           r"1025 layers; the limit is 1024")),
    ("index-manifests-not-a-list", served(lambda m: {"schemaVersion": 2, "mediaType": OCI_INDEX,
                                                     "manifests": "all"},
                                          r"'manifests' is not a list", OCI_INDEX)),
    ("index-platform-with-newline", served(
        index_of(platform={"os": "linux\nerror: forged", "architecture": "amd64"}),
        r"index entry 0: platform fields are not short plain names", OCI_INDEX)),
    ("index-platform-variant-object", served(
        index_of(platform={"os": "linux", "architecture": "arm64", "variant": {"v": 8}}),
        r"index entry 0: platform fields are not short plain names", OCI_INDEX)),
    ("index-child-is-an-index", index_child_is_index),
    ("index-without-the-platform", index_without_platform),
    ("by-digest-body-altered", by_digest_body_altered),
    ("tag-digest-header-disagrees", digest_header(
        f"sha256:{'0' * 64}", rf"expected sha256:{'0' * 64}, got sha256:")),
    ("tag-digest-header-traversal", digest_header(
        f"sha256:{ESCAPE}", r"Docker-Content-Digest")),
)


@pytest.mark.parametrize("setup", MANIFESTS)
def test_hostile_manifest(ctx: Ctx, setup: Setup) -> None:
    _play(ctx, setup)


# ------------------------------------------------------------------ 4. image configs


def crafted_config(make: Callable[[Layer], Any], expect: str) -> Setup:
    """An image whose config blob is `make(layer)` (JSON, or bytes as is), pushed honestly:
    the config's digest is right, its content is hostile. The layer is never fetched."""

    def setup(ctx: Ctx) -> Scenario:
        lay, repo = ctx.honest.layer, _repo()
        ctx.registry.push_blob(repo, lay.blob)
        made = make(lay)
        data = made if isinstance(made, bytes) else canonical_json(made)
        digest = ctx.registry.push_blob(repo, data)
        manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                    "config": {"mediaType": OCI_CONFIG, "digest": digest, "size": len(data)},
                    "layers": [lay.descriptor()]}
        ctx.registry.push_manifest(repo, "1", canonical_json(manifest), OCI_MANIFEST)
        return Scenario(["warm", f"{ctx.proxy.host}/{repo}:1"], expect,
                        hostile=[lay.digest], never=[rf"/blobs/{lay.digest}$"])

    return setup


def rootfs(*diff_ids: Any) -> Callable[[Layer], Any]:
    return lambda lay: {"architecture": "amd64", "os": "linux",
                        "rootfs": {"type": "layers", "diff_ids": list(diff_ids)}}


def config_altered_in_transit(ctx: Ctx) -> Scenario:
    ctx.proxy.flip_byte(ctx.honest.config_path, offset=10)
    return Scenario(["warm", ctx.honest.ref(ctx.proxy)],
                    rf"blob {ctx.honest.image.config_digest} from .*digest mismatch",
                    hostile=[ctx.honest.layer.digest], never=[ctx.honest.blob_path])


CONFIGS = _cases(
    ("not-json", crafted_config(lambda lay: b"{\"rootfs\": {not json", r"image config is not "
                                r"valid JSON")),
    ("json-array", crafted_config(lambda lay: [lay.diff_id], r"image config is not a JSON obj")),
    ("no-rootfs", crafted_config(lambda lay: {"architecture": "amd64", "os": "linux"},
                                 r"image config has no rootfs\.diff_ids list")),
    ("rootfs-a-list", crafted_config(lambda lay: {"rootfs": [lay.diff_id]},
                                     r"image config has no rootfs\.diff_ids list")),
    ("diff-ids-a-string", crafted_config(
        lambda lay: {"rootfs": {"type": "layers", "diff_ids": lay.diff_id}},
        r"image config has no rootfs\.diff_ids list")),
    ("two-diff-ids-one-layer", crafted_config(
        lambda lay: rootfs(lay.diff_id, lay.diff_id)(lay),
        r"manifest lists 1 layer but the image config has 2 diff_ids")),
    ("no-diff-ids", crafted_config(rootfs(), r"image config has 0 diff_ids")),
    ("diff-id-traversal", crafted_config(rootfs(f"sha256:{ESCAPE}"),
                                         r"image config diff_id: invalid digest")),
    ("diff-id-null", crafted_config(rootfs(None),
                                    r"image config diff_id: digest must be a string")),
    ("diff-id-uppercase-hex", crafted_config(rootfs(f"sha256:{HEX.upper()}"),
                                             r"image config diff_id: invalid digest")),
    ("larger-than-8MiB", crafted_config(
        lambda lay: {**rootfs(lay.diff_id)(lay), "pad": "x" * (9 << 20)},
        r"larger than 8388608 bytes")),
    ("altered-in-transit", config_altered_in_transit),
)


@pytest.mark.parametrize("setup", CONFIGS)
def test_hostile_image_config(ctx: Ctx, setup: Setup) -> None:
    _play(ctx, setup)


def test_config_platform_variant_not_a_string(ctx: Ctx) -> None:
    """A config whose `variant` is a number: cosmetic, so either warm the layer (exit 0,
    valid JSON) or refuse the config naming the field; never a crash."""
    lay = ctx.honest.layer
    sc = crafted_config(lambda x: {**rootfs(x.diff_id)(x), "variant": 8}, r"variant")(ctx)
    run, before = ctx.box.run("warm", "--json", *sc.args[1:])
    if run.returncode == 0:
        check_success(ctx.box, run, before)
        assert json.loads(run.stdout)["ok"] is True
        assert (ctx.box.cache / _name(lay.digest)).read_bytes() == lay.tar
    else:
        check_failure(ctx.box, run, before, code=1, expect=sc.expect, hostile=[lay.digest])


# ------------------------------------------------------------------ 5. layer blobs


def pushed(build: Callable[[], list[Layer]], expect: str, *, env: dict[str, str] | None = None,
           fetched: bool = True) -> Setup:
    """An image of the layers `build()` makes, pushed honestly (the blobs are what the
    manifest says, but hostile); none of them may end up cached."""

    def setup(ctx: Ctx) -> Scenario:
        layers, repo = build(), _repo()
        ctx.registry.push_image(repo, "1", Image(layers))
        never = [] if fetched else [rf"/blobs/{x.digest}$" for x in layers]
        return Scenario(["warm", f"{ctx.proxy.host}/{repo}:1"], expect, env=env or {},
                        hostile=[x.digest for x in layers], never=never)

    return setup


@cache
def _tar(seed: int, size: int = 30_000) -> bytes:
    return random_tar(seed, size)


def _noise(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def raw_blob(blob: bytes, media_type: str, diff_id_of: bytes) -> Layer:
    """A layer whose blob is `blob` exactly (digest and size honest), typed `media_type`."""
    return Layer(blob, "none", override_media_type=media_type,
                 override_diff_id=sha256_digest(diff_id_of))


def _truncated(compression: str) -> Layer:
    tar = _tar(50, 200_000)
    blob = compress(tar, compression)
    return raw_blob(blob[: len(blob) // 2], GZIP if compression == "gzip" else ZSTD, tar)


def _sized(delta: int | None) -> list[Layer]:
    honest = Layer(_tar(60), "gzip")
    return [Layer(_tar(60), "gzip", override_size=0 if delta is None else honest.size + delta)]


@cache
def _zeros_tar(size: int) -> bytes:
    return make_tar([File("zeros.bin", b"\0" * size)])


MEDIA_TYPE_CRLF = GZIP + "\r\nX-Injected: 1"

LAYERS = _cases(
    ("gzip-type-on-zstd-data", pushed(lambda: [Layer(_tar(41), "zstd", override_media_type=GZIP)],
                                      r"media type says gzip but the data is not")),
    ("zstd-type-on-gzip-data", pushed(lambda: [Layer(_tar(42), "gzip", override_media_type=ZSTD)],
                                      r"media type says zstd but the data is not")),
    ("gzip-type-on-plain-tar", pushed(lambda: [Layer(_tar(43), "none", override_media_type=GZIP)],
                                      r"media type says gzip but the data is not")),
    ("gzip-truncated", pushed(lambda: [_truncated("gzip")], r"gzip stream is truncated")),
    ("gzip-garbage-after-magic", pushed(
        lambda: [raw_blob(b"\x1f\x8b" + _noise(44, 4096), GZIP, b"")], r"corrupt gzip data")),
    ("gzip-trailing-garbage", pushed(
        lambda: [raw_blob(compress(_tar(45), "gzip") + b"GARBAGE!" * 64, GZIP, _tar(45))],
        r"corrupt gzip data")),
    ("zstd-truncated", pushed(lambda: [_truncated("zstd")],
                              r"corrupt zstd data|decompressed content is sha256:.*diff_id")),
    ("zstd-garbage-after-magic", pushed(
        lambda: [raw_blob(b"\x28\xb5\x2f\xfd" + _noise(46, 4096), ZSTD, b"")],
        r"corrupt zstd data")),
    ("size-smaller-than-blob", pushed(lambda: _sized(-1), r"more than the expected \d+ bytes")),
    ("size-larger-than-blob", pushed(lambda: _sized(+1000), r"got \d+ bytes, expected \d+")),
    ("size-zero", pushed(lambda: _sized(None),
                         r"more than the expected 0 bytes|layer blob digest mismatch")),
    ("wrong-diff-id", pushed(
        lambda: [Layer(_tar(47), "gzip", override_diff_id=f"sha256:{'0' * 64}")],
        rf"but the image config says diff_id sha256:{'0' * 64}")),
    ("media-type-lz4", pushed(
        lambda: [Layer(_tar(48), "gzip", override_media_type=GZIP.replace("gzip", "lz4"))],
        r"unsupported media type 'application/vnd\.oci\.image\.layer\.v1\.tar\+lz4'",
        fetched=False)),
    ("media-type-empty", served(layer0(mediaType=""), r"unsupported media type ''",
                                blobs_ok=True)),
    ("media-type-with-crlf", served(layer0(mediaType=MEDIA_TYPE_CRLF),
                                    r"unsupported media type '.*\\r\\nX-Injected", blobs_ok=True)),
    ("media-type-foreign", served(
        layer0(mediaType="application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"),
        r"unsupported media type 'application/vnd\.docker\.image\.rootfs\.foreign",
        blobs_ok=True)),
    ("bomb-over-ratio", pushed(
        lambda: [Layer(_zeros_tar(8 << 20), "gzip")], r"expands more than 100:1",
        env={"LAYERWARM_MAX_RATIO": "100", "LAYERWARM_RATIO_FLOOR": str(1 << 20)})),
    ("bomb-over-absolute-cap", pushed(
        lambda: [Layer(_zeros_tar(8 << 20), "zstd")], r"decompresses to more than 1000000 bytes",
        env={"LAYERWARM_MAX_LAYER_BYTES": "1000000"})),
)


@pytest.mark.parametrize("setup", LAYERS)
def test_hostile_layer_blob(ctx: Ctx, setup: Setup) -> None:
    _play(ctx, setup)


def _passwd() -> str:
    return hashlib.sha256(Path("/etc/passwd").read_bytes()).hexdigest()


TAR_MEMBERS = [
    pytest.param([File(f"/tmp/lw-hostile-{MARK}-abs", b"absolute")],
                 [Path(f"/tmp/lw-hostile-{MARK}-abs")], id="absolute-path"),
    pytest.param([File(f"../../lw-hostile-{MARK}-up", b"dotdot")], [], id="dotdot-path"),
    pytest.param([Symlink("etc", "/etc"), File(f"etc/lw-hostile-{MARK}-via-link", b"x")],
                 [Path(f"/etc/lw-hostile-{MARK}-via-link")], id="write-through-symlink-to-etc"),
    pytest.param([Hardlink("pw", "/etc/passwd"), File("pw", b"root::0:0::/root:/bin/sh\n")],
                 [], id="hardlink-to-etc-passwd"),
    pytest.param([Dir("bin"), File("bin/su", b"#!/bin/sh\n", mode=0o6755)], [],
                 id="setuid-file"),
]


@pytest.mark.parametrize(("members", "watch"), TAR_MEMBERS)
def test_hostile_tar_members_are_stored_not_extracted(
    ctx: Ctx, members: list[Any], watch: list[Path]
) -> None:
    """Not errors: layerwarm stores the tar byte for byte and never extracts it."""
    tar = make_tar([Dir("ok"), *members])
    lay, repo = Layer(tar, "gzip"), _repo()
    ctx.registry.push_image(repo, "1", Image([lay]))
    passwd = _passwd()
    run, before = ctx.box.run("warm", f"{ctx.proxy.host}/{repo}:1")
    rel = [m.path for m in members if m.path.startswith("../")]
    check_success(ctx.box, run, before,
                  watch=[*watch, *(p for r in rel for p in escape_targets(ctx.box, r))])
    entry = ctx.box.cache / _name(lay.digest)
    assert entries(ctx.box.cache) == {entry.name}
    assert entry.read_bytes() == tar, "the cache entry is not the layer's tar"
    assert entry.stat().st_mode & 0o7777 == 0o644, "an entry is a plain, non-executable file"
    assert _passwd() == passwd, "/etc/passwd changed"


# ------------------------------------------------------------------ 6. redirects and auth


def answer(status: int, headers: dict[str, str] | None, expect: str, *, body: bytes = b"",
           also: tuple[tuple[str, int, bytes, dict[str, str]], ...] = (),
           never: tuple[str, ...] = (), most: int | None = None, timeout: float = 60.0,
           max_seconds: float | None = None) -> Setup:
    """The honest tag answers `status` with `headers` every time ("{proxy}" in a header is
    the proxy's URL, "{self}" the tag's own URL); `also` are more canned answers (e.g. a
    token endpoint on the proxy)."""

    def setup(ctx: Ctx) -> Scenario:
        own = f"{ctx.proxy.url}/v2/{ctx.honest.repo}/manifests/{ctx.honest.tag}"

        def fill(h: dict[str, str] | None) -> dict[str, str]:
            return {k: v.replace("{proxy}", ctx.proxy.url).replace("{self}", own)
                    for k, v in (h or {}).items()}

        ctx.proxy.override(ctx.honest.manifest_path, status, body, fill(headers))
        for path, st, b, h in also:
            ctx.proxy.override(path, st, b, fill(h))
        return Scenario(
            ["warm", ctx.honest.ref(ctx.proxy)], expect, never=[r"/blobs/", *never],
            most=(ctx.honest.manifest_path, most) if most is not None else None,
            timeout=timeout, max_seconds=max_seconds)

    return setup


def _token(token: str) -> tuple[str, int, bytes, dict[str, str]]:
    return (r"^/token", 200, json.dumps({"token": token}).encode(), JSON_HEADERS)


BEARER_HERE = {"WWW-Authenticate": 'Bearer realm="{proxy}/token",service="hostile"'}

REDIRECTS_AND_AUTH = _cases(
    ("redirect-to-file-url", answer(302, {"Location": "file:///etc/passwd"},
                                    r"refusing redirect to a non-HTTP URL \(file:\)")),
    ("redirect-to-ftp", answer(302, {"Location": "ftp://127.0.0.1/x"},
                               r"refusing redirect to a non-HTTP URL \(ftp:\)")),
    ("redirect-to-javascript", answer(307, {"Location": "javascript:alert(1)"},
                                      r"refusing redirect to a non-HTTP URL \(javascript:\)")),
    ("redirect-to-data-url", answer(308, {"Location": "data:application/json,{}"},
                                    r"refusing redirect to a non-HTTP URL \(data:\)")),
    ("redirect-loop", answer(301, {"Location": "{self}"}, r"more than 5 redirects", most=6)),
    ("redirect-without-location", answer(302, {}, r"HTTP 302")),
    ("401-garbage-challenge", answer(401, {"WWW-Authenticate": "!!! not a challenge ;;; ="},
                                     r"answered 401 with no usable challenge")),
    ("401-no-challenge", answer(401, {}, r"no usable challenge \(schemes: none\)")),
    ("bearer-realm-file-url", answer(
        401, {"WWW-Authenticate": 'Bearer realm="file:///etc/passwd",service="x"'},
        r"token server 'file:///etc/passwd'.*refusing")),
    ("bearer-realm-plain-http-remote", answer(
        401, {"WWW-Authenticate": 'Bearer realm="http://10.255.255.1/token",service="x"'},
        r"token server 'http://10\.255\.255\.1/token', which is not https.*refusing",
        max_seconds=15)),
    ("bearer-realm-empty", answer(401, {"WWW-Authenticate": 'Bearer realm=""'},
                                  r"no usable challenge \(schemes: bearer\)")),
    ("token-server-html", answer(401, BEARER_HERE, r"token server 127\.0\.0\.1:\d+ gave no token",
                                 also=((r"^/token", 200, HTML_PAGE, HTML_HEADERS),))),
    ("token-server-redirects", answer(
        401, BEARER_HERE, r"gave no token .*\(HTTP 302\)", never=(r"^/stolen",),
        also=((r"^/token", 302, b"", {"Location": "{proxy}/stolen"}),))),
    ("401-forever-after-token", answer(401, BEARER_HERE, r"refused: HTTP 401",
                                       also=(_token("t0k"),))),
    ("basic-without-credentials", answer(401, {"WWW-Authenticate": 'Basic realm="registry"'},
                                         r"asks for a login and there are no credentials")),
    ("403-denied", answer(403, JSON_HEADERS, r"refused: HTTP 403 DENIED", body=json.dumps(
        {"errors": [{"code": "DENIED", "message": "no"}]}).encode())),
)


@pytest.mark.parametrize("setup", REDIRECTS_AND_AUTH)
def test_hostile_redirect_or_challenge(ctx: Ctx, setup: Setup) -> None:
    _play(ctx, setup)


# ------------------------------------------------------------------ 7. server errors


def error_on(path: Callable[[Honest], str], status: int, expect: str, *, body: bytes = b"",
             headers: dict[str, str] | None = None,
             timeout: float = 60.0, max_seconds: float | None = None) -> Setup:
    """`path(honest)` answers `status` forever."""

    def setup(ctx: Ctx) -> Scenario:
        ctx.proxy.override(path(ctx.honest), status, body, headers)
        return Scenario(["warm", ctx.honest.ref(ctx.proxy)], expect,
                        hostile=[ctx.honest.layer.digest], timeout=timeout,
                        max_seconds=max_seconds)

    return setup


def _errors(code: str, message: str) -> bytes:
    return json.dumps({"errors": [{"code": code, "message": message}]}).encode()


def _manifest(h: Honest) -> str:
    return h.manifest_path


def _blob(h: Honest) -> str:
    return h.blob_path


def _config(h: Honest) -> str:
    return h.config_path


SERVER_ERRORS = _cases(
    ("blob-404", error_on(_blob, 404, r"blob sha256:[0-9a-f]{64} not found in .*BLOB_UNKNOWN",
                          body=_errors("BLOB_UNKNOWN", "blob unknown"), headers=JSON_HEADERS)),
    ("config-404-html", error_on(_config, 404, r"blob sha256:[0-9a-f]{64} not found in "
                                 r".*\(HTTP 404 Not Found\)", body=HTML_PAGE,
                                 headers=HTML_HEADERS)),
    ("manifest-404-html", error_on(_manifest, 404, r"manifest 1 not found in .*\(HTTP 404 Not "
                                   r"Found\)$", body=HTML_PAGE, headers=HTML_HEADERS)),
    ("error-message-multiline", error_on(
        _manifest, 400, r"HTTP 400 DENIED: first line second line error: forged$",
        body=_errors("DENIED", "first line\nsecond line\r\nerror: forged"), headers=JSON_HEADERS)),
    ("error-message-terminal-escapes", error_on(
        _manifest, 404, r"manifest 1 not found in",
        body=_errors("MANIFEST_UNKNOWN", "\x1b[2J\x1b[31mgone\x07"), headers=JSON_HEADERS)),
    ("429-retry-after-an-hour", error_on(_manifest, 429, r"HTTP 429",
                                         headers={"Retry-After": "3600"}, max_seconds=15)),
    ("blob-206-bogus-content-range", error_on(
        _blob, 206, r"Content-Range 'bytes 500-509/1000'", body=b"x" * 10,
        headers={"Content-Range": "bytes 500-509/1000"})),
)


@pytest.mark.parametrize("setup", SERVER_ERRORS)
def test_hostile_server_error(ctx: Ctx, setup: Setup) -> None:
    _play(ctx, setup)


# ------------------------------------------------------------------ slow cases, run alongside

# Cases that spend their time waiting (the client's retry backoff, or a hang cut short by
# the case's timeout). They start in the background when the module starts, each with its
# own proxy and sandbox, and their tests at the end of the module collect the results, so
# the waiting overlaps the rest of the corpus instead of adding to it.
SLOW_AUTH = _cases(
    ("token-with-crlf", answer(401, BEARER_HERE, r"token",
                               also=(_token("t0k\r\nX-Injected: 1"),))),
    ("challenge-redos", answer(
        401, {"WWW-Authenticate": 'Basic realm="x"' + " " * 60_000 + "!"},
        r"asks for a login|no usable challenge", timeout=20)),
)
SLOW_SERVER_ERRORS = _cases(
    ("manifest-500-forever-html", error_on(
        _manifest, 500, r"manifest 1 from 127\.0\.0\.1:\d+/hostile/\w+: HTTP 500",
        body=HTML_PAGE, headers=HTML_HEADERS)),
    ("blob-500-forever", error_on(
        _blob, 500, r"layer sha256:[0-9a-f]{64}: .*HTTP 500", timeout=90)),
)
SLOW = [*SLOW_AUTH, *SLOW_SERVER_ERRORS]


@dataclass
class Started:
    ctx: Ctx
    scenario: Scenario
    run: Future[tuple[Run, dict[str, str]]]


@pytest.fixture(scope="module", autouse=True)
def slow_runs(
    request: pytest.FixtureRequest, registry: RegistryServer, honest: Honest,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, Started]]:
    """Start the selected slow cases (see above); wait for all of them at module end."""
    selected = {item.callspec.id for item in request.session.items
                if getattr(item, "module", None) is request.module
                and getattr(item, "originalname", None) == "test_hostile_slow_case"}
    started: dict[str, Started] = {}
    proxies: list[Proxy] = []
    with ThreadPoolExecutor(max_workers=len(SLOW)) as pool:
        try:
            for param in SLOW:
                if param.id not in selected:
                    continue
                proxies.append(Proxy(registry.url))
                box = Sandbox(tmp_path_factory.mktemp(f"slow-{param.id}"))
                ctx = Ctx(registry, proxies[-1], box, honest)
                sc = param.values[0](ctx)
                run = pool.submit(box.run, *sc.args, env=sc.env, timeout=sc.timeout)
                started[param.id] = Started(ctx, sc, run)
            yield started
        finally:
            for case in started.values():
                case.run.exception()  # each run is bounded by its own timeout
            for p in proxies:
                p.stop()


@pytest.mark.parametrize("setup", SLOW)
def test_hostile_slow_case(
    slow_runs: dict[str, Started], request: pytest.FixtureRequest, setup: Setup
) -> None:
    case = slow_runs[request.node.callspec.id]
    run, before = case.run.result()
    _check(case.ctx, case.scenario, run, before)


def test_corpus_size() -> None:
    """The corpus keeps its breadth: at least five cases in every category."""
    tables = {"references": REFERENCES, "digests": DIGESTS, "manifests": MANIFESTS,
              "configs": CONFIGS, "layers": LAYERS, "tar members": TAR_MEMBERS,
              "redirects/auth": [*REDIRECTS_AND_AUTH, *SLOW_AUTH],
              "server errors": [*SERVER_ERRORS, *SLOW_SERVER_ERRORS]}
    small = {k: len(v) for k, v in tables.items() if len(v) < 5}
    assert not small, f"categories with fewer than 5 cases: {small}"
    ids = [p.id for t in tables.values() for p in t]
    assert len(ids) >= 40
