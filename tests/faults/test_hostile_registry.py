"""A hostile registry (issue 12): documents that break the parser, an index that fans out
without end, redirects around the plain-HTTP rule, answers trickled a byte at a time.

Each case runs the real CLI against `HostileRegistry` (tests/support/hostile_registry.py),
a small server that serves crafted documents and honest images, and counts what it is
asked; honest references come from the real docker-registry. Every run keeps the hostile
corpus's invariants (tests/support/hostile.py: exit code, one-line errors, no traceback,
nothing cached for the hostile layer, nothing written outside the cache), and the cache
verifies clean afterwards.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from pipeline.plan import ImageFailure, ResolvedImage, resolve_all
from pipeline.reference import Reference
from tests.support.cli import entries
from tests.support.hostile import Run, Sandbox, check_failure, check_success
from tests.support.hostile_registry import Answer, HostileRegistry, plain_http_name
from tests.support.images import (
    OCI_CONFIG,
    OCI_MANIFEST,
    Image,
    Layer,
    Platform,
    canonical_json,
    random_tar,
    sha256_digest,
)
from tests.support.registry import RegistryServer

AMD64 = ("--platform", "linux/amd64")


def _name(digest: str) -> str:
    return "sha256_" + digest.removeprefix("sha256:")


def _repo(kind: str) -> str:
    return f"{kind}/{uuid.uuid4().hex[:8]}"


def _image(seed: int, size: int = 4_000, platform: Platform | None = None) -> Image:
    return Image([Layer(random_tar(seed, size), "gzip")], platform=platform or Platform())


@pytest.fixture
def hostile() -> Iterator[HostileRegistry]:
    with closing(HostileRegistry()) as server:
        yield server


@pytest.fixture
def box(tmp_path: Path) -> Sandbox:
    return Sandbox(tmp_path)


def _verify_clean(box: Sandbox) -> None:
    run, _ = box.run("verify")
    assert run.returncode == 0, f"the cache does not verify clean\n{run.show()}\n{run.stdout}"


def _one_error(run: Run, errors: list[str]) -> str:
    assert len(errors) == 1, f"want exactly one error line\n{run.show()}"
    return errors[0]


# ------------------------------------------------------------------ 1. one bad reference

DEEP = b"[" * 200_000  # parses to RecursionError in json, far past any real document


def _deep_manifest(hostile: HostileRegistry, repo: str) -> str:
    hostile.serve(f"/v2/{repo}/manifests/1", Answer(200, DEEP, {"Content-Type": OCI_MANIFEST}))
    return r"manifest is not valid JSON: nested too deeply"


def _deep_config(hostile: HostileRegistry, repo: str) -> str:
    layer = Layer(random_tar(12, 2_000), "gzip")
    config = hostile.serve_blob(repo, DEEP)
    manifest = canonical_json({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config, "size": len(DEEP)},
        "layers": [layer.descriptor()]})
    hostile.serve(f"/v2/{repo}/manifests/1",
                  Answer(200, manifest, {"Content-Type": OCI_MANIFEST}))
    return r"image config is not valid JSON: nested too deeply"


@pytest.mark.parametrize("serve", [_deep_manifest, _deep_config], ids=["manifest", "config"])
def test_a_document_nested_too_deep_fails_only_its_reference(
    registry: RegistryServer, hostile: HostileRegistry, box: Sandbox, serve: Any,
) -> None:
    good, good_repo = _image(11), _repo("good")
    registry.push_image(good_repo, "1", good)
    bad_repo = _repo("deep")
    expect = serve(hostile, bad_repo)
    bad_ref = f"{hostile.host}/{bad_repo}:1"

    run, before = box.run("warm", *AMD64, f"{registry.host}/{good_repo}:1", bad_ref)

    good_entry = _name(good.layers[0].digest)
    errors = check_failure(box, run, before, code=1, allowed=[good_entry],
                           expect=rf"^error: {re.escape(bad_ref)}: {expect}$")
    _one_error(run, errors)
    assert entries(box.cache) == {good_entry}, "the good reference was not warmed"
    assert hostile.count(r"/blobs/") == hostile.count(sha256_digest(DEEP)), "a layer was asked"
    _verify_clean(box)


def test_an_unexpected_error_fails_only_its_reference(caplog: pytest.LogCaptureFixture) -> None:
    """A bug met while resolving one reference (here a KeyError) is that reference's failure,
    in one line, with the traceback at debug level; the other references go on."""
    good, bad = Reference.parse("127.0.0.1:1/ok/image:1"), Reference.parse("127.0.0.1:1/x/y:1")

    class Buggy:
        def resolve(self, ref: Reference, platform: object) -> list[ResolvedImage]:
            if ref == bad:
                raise KeyError("schemaVersion")
            return []

    with caplog.at_level(logging.DEBUG, logger="layerwarm"), ThreadPoolExecutor(2) as pool:
        plan = resolve_all(Buggy(), [good, bad], None, pool)  # type: ignore[arg-type]
    assert list(plan.failures) == [ImageFailure(str(bad), "unexpected KeyError: 'schemaVersion'")]
    logged = [r for r in caplog.records if r.levelno == logging.DEBUG and r.exc_info]
    assert logged and str(bad) in logged[0].getMessage()


# ------------------------------------------------------------------ 2. index fan-out


def _fake_children(n: int) -> list[dict[str, object]]:
    return [{"mediaType": OCI_MANIFEST, "digest": sha256_digest(f"child {i}".encode()),
             "size": 500, "platform": {"os": "linux", "architecture": f"arch{i}"}}
            for i in range(n)]


def test_an_index_of_2000_children_is_refused_before_any_child_request(
    hostile: HostileRegistry, box: Sandbox,
) -> None:
    repo = _repo("fan")
    hostile.serve_index(repo, "wide", _fake_children(2000))

    run, before = box.run("warm", "--all-platforms", f"{hostile.host}/{repo}:wide")

    check_failure(box, run, before, code=1,
                  expect=r"index lists 2000 image manifests; the limit is 64 "
                         r"\(LAYERWARM_MAX_INDEX_CHILDREN\)$")
    assert hostile.hits == [f"/v2/{repo}/manifests/wide"], "a child was asked for"


def _entry(image: Image) -> dict[str, object]:
    return {"mediaType": OCI_MANIFEST, "digest": image.manifest_digest,
            "size": len(image.manifest_bytes()), "platform": image.platform.as_dict()}


def _attestation(i: int) -> dict[str, object]:
    return {"mediaType": OCI_MANIFEST, "digest": sha256_digest(f"attestation {i}".encode()),
            "size": 800, "platform": {"os": "unknown", "architecture": "unknown"},
            "annotations": {"vnd.docker.reference.type": "attestation-manifest"}}


def test_the_index_limit_counts_the_images_fetched(
    hostile: HostileRegistry, box: Sandbox, tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Like a real multi-arch index: images plus attestation manifests, which are never
    fetched and so do not count. At the limit it warms; one image past it, nothing is asked."""
    images = [_image(21 + i, platform=Platform("linux", arch))
              for i, arch in enumerate(("amd64", "arm64", "s390x"))]
    repo = _repo("fan")
    for image in images:
        hostile.serve_image(repo, image.manifest_digest, image)
    hostile.serve_index(repo, "two", [*map(_entry, images[:2]), _attestation(1), _attestation(2)])
    hostile.serve_index(repo, "three", [*map(_entry, images), _attestation(1)])
    limit = {"LAYERWARM_MAX_INDEX_CHILDREN": "2"}

    run, before = box.run("warm", "--all-platforms", f"{hostile.host}/{repo}:two", env=limit)
    check_success(box, run, before)
    assert entries(box.cache) == {_name(x.layers[0].digest) for x in images[:2]}
    assert hostile.count("attestation") == 0

    wide = Sandbox(tmp_path_factory.mktemp("wide"))
    asked = len(hostile.hits)
    run, before = wide.run("warm", "--all-platforms", f"{hostile.host}/{repo}:three", env=limit)
    check_failure(wide, run, before, code=1,
                  expect=r"index lists 3 image manifests; the limit is 2 "
                         r"\(LAYERWARM_MAX_INDEX_CHILDREN\)$")
    assert hostile.hits[asked:] == [f"/v2/{repo}/manifests/three"], "a child was asked for"


# ------------------------------------------------------------------ 3. redirects


def _layer_path(repo: str, image: Image) -> str:
    return f"/v2/{repo}/blobs/{image.layers[0].digest}"


def _config_path(repo: str, image: Image) -> str:
    return f"/v2/{repo}/blobs/{image.config_digest}"


def _manifest_path(repo: str, image: Image) -> str:
    return f"/v2/{repo}/manifests/1"


@pytest.mark.parametrize("path", [_layer_path, _config_path, _manifest_path],
                         ids=["layer-blob", "config", "manifest"])
def test_a_redirect_to_plain_http_follows_the_plain_http_rule(
    hostile: HostileRegistry, box: Sandbox, path: Any,
) -> None:
    """The registry sends a GET on to http://<a name not allowed plain HTTP>: refused like
    a reference to that name would be, before any request reaches it."""
    name, address = plain_http_name()
    image, repo = _image(31), _repo("redirect")
    with closing(HostileRegistry(bind=address)) as target:
        target.serve_image(repo, "1", image)  # an honest copy: following would "work"
        hostile.serve_image(repo, "1", image)
        where = path(repo, image)
        hostile.serve(where, Answer.redirect(f"http://{name}:{target.port}{where}"))

        run, before = box.run("warm", *AMD64, f"{hostile.host}/{repo}:1",
                              env={"LAYERWARM_RETRY_ATTEMPTS": "2"})

        check_failure(box, run, before, code=1, hostile=[image.layers[0].digest],
                      expect=rf"refusing redirect to plain HTTP at {re.escape(name)}:"
                             rf"{target.port} \(not https, not loopback, not in "
                             r"LAYERWARM_INSECURE_REGISTRIES\)$")
        assert target.hits == [], "the plain-HTTP target was asked"
    assert hostile.count(re.escape(where)) == 1, "a refused redirect is not retried"


# ------------------------------------------------------------------ 4. deadlines

FAST_DEADLINES = {"LAYERWARM_REQUEST_DEADLINE": "2", "LAYERWARM_STALL_SECONDS": "2",
                  "LAYERWARM_RETRY_ATTEMPTS": "2"}
HANG = 45.0  # a run still going then is a hang (each case ends in about 5 s)


def _slow(hostile: HostileRegistry, where: str, *, head: bool = False) -> str:
    """`where` answers as before, a byte a second (`head`: its headers too); its regex."""
    was = hostile.served(where)
    hostile.serve(where, Answer(was.status, was.body, was.headers, trickle=1.0, trickle_head=head))
    return re.escape(where) + "$"


def manifest_body(hostile: HostileRegistry, repo: str, image: Image) -> str:
    return _slow(hostile, _manifest_path(repo, image))


def manifest_headers(hostile: HostileRegistry, repo: str, image: Image) -> str:
    return _slow(hostile, _manifest_path(repo, image), head=True)


def config_body(hostile: HostileRegistry, repo: str, image: Image) -> str:
    return _slow(hostile, _config_path(repo, image))


def error_body(hostile: HostileRegistry, repo: str, image: Image) -> str:
    """A 404 whose JSON error body (which the client reads for its message) trickles."""
    body = b'{"errors": [{"code": "MANIFEST_UNKNOWN", "message": "manifest unknown"}]}'
    hostile.serve(_manifest_path(repo, image),
                  Answer(404, body, {"Content-Type": "application/json"}))
    return _slow(hostile, _manifest_path(repo, image))


def token_body(hostile: HostileRegistry, repo: str, image: Image) -> str:
    """The registry asks for a bearer token; the token server trickles it."""
    challenge = f'Bearer realm="http://{hostile.host}/token",service="hostile"'
    hostile.serve(_manifest_path(repo, image), Answer(401, headers={"WWW-Authenticate": challenge}))
    hostile.serve("/token", Answer(200, b'{"token": "t0k"}', {"Content-Type": "application/json"}))
    _slow(hostile, "/token")
    return r"^/token\?"


@pytest.mark.parametrize("setup", [manifest_body, manifest_headers, config_body, error_body,
                                   token_body])
def test_a_trickled_document_fails_at_the_request_deadline(
    hostile: HostileRegistry, box: Sandbox, setup: Any,
) -> None:
    image, repo = _image(41), _repo("slow")
    hostile.serve_image(repo, "1", image)
    trickled = setup(hostile, repo, image)
    what = f"blob {image.config_digest}" if setup is config_body else "manifest 1"

    run, before = box.run("warm", *AMD64, f"{hostile.host}/{repo}:1", env=FAST_DEADLINES,
                          timeout=HANG)

    check_failure(box, run, before, code=1, hostile=[image.layers[0].digest],
                  expect=rf"{what} from 127\.0\.0\.1:\d+/{re.escape(repo)}: no complete "
                         r"answer within the 2 s request deadline "
                         r"\(LAYERWARM_REQUEST_DEADLINE\)$")
    assert hostile.count(trickled) == 2, "the deadline is retried like a timeout"
    assert hostile.count(re.escape(_layer_path(repo, image))) == 0
    assert run.seconds < 30, run.show()


def test_a_stalled_blob_is_cut_while_a_slow_moving_one_is_not(
    hostile: HostileRegistry, box: Sandbox,
) -> None:
    """Blobs may take longer than the request deadline as long as they keep moving (here
    128 KiB every 0.5 s for 2.5 s, past a 1 s deadline); a byte a second is a stall."""
    slow, slow_repo = _image(51, 1_300_000), _repo("moving")  # random: ~640 KiB gzipped
    stuck, stuck_repo = _image(52), _repo("stalled")
    hostile.serve_image(slow_repo, "1", slow)
    hostile.serve_image(stuck_repo, "1", stuck)
    hostile.serve_blob(slow_repo, slow.layers[0].blob, trickle=0.5, step=128 << 10)
    hostile.serve_blob(stuck_repo, stuck.layers[0].blob, trickle=1.0)
    env = {**FAST_DEADLINES, "LAYERWARM_REQUEST_DEADLINE": "1"}

    run, before = box.run("warm", *AMD64, f"{hostile.host}/{slow_repo}:1",
                          f"{hostile.host}/{stuck_repo}:1", env=env, timeout=HANG)

    slow_entry, stuck_digest = _name(slow.layers[0].digest), stuck.layers[0].digest
    errors = check_failure(
        box, run, before, code=1, hostile=[stuck_digest], allowed=[slow_entry],
        expect=rf"^error: layer {stuck_digest}: blob {stuck_digest} from 127\.0\.0\.1:\d+/"
               rf"{re.escape(stuck_repo)}: stalled: less than 64 KiB in 2 s "
               r"\(LAYERWARM_STALL_SECONDS\)$")
    _one_error(run, errors)
    assert entries(box.cache) == {slow_entry}, "the slow but moving blob was cut"
    assert hostile.count(re.escape(_layer_path(stuck_repo, stuck))) == 2
    assert run.seconds < 30, run.show()
    _verify_clean(box)
