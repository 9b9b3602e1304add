"""The habits of the ecosystem (issue 13 item 4), through the real CLI.

Counts read as English ("1 layer", "evicted 1 layer") and a failed image is named in the
stdout summary, not only on stderr.
"""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

from tests.support.cli import entries, layerwarm_cmd, layerwarm_env, run_layerwarm
from tests.support.fleet import broker_url_for, running_fleet
from tests.support.fleetcheck import S3Tier
from tests.support.images import Image, Layer, random_tar
from tests.support.procs import free_port
from tests.support.registry import RegistryServer
from tests.support.s3 import S3Server


def _repo() -> str:
    return f"t/{uuid.uuid4().hex[:10]}"


def _push_one_layer(registry: RegistryServer, seed: int) -> tuple[str, Layer]:
    lay = Layer(tar=random_tar(seed, 50_000), compression="gzip")
    repo = _repo()
    registry.push_image(repo, "1.0", Image([lay], format="oci"))
    return f"{registry.host}/{repo}:1.0", lay


def _last_line(out: str) -> str:
    return out.strip().splitlines()[-1]


def test_summaries_say_one_layer_not_one_layers(registry: RegistryServer, cache_dir: Path) -> None:
    ref, lay = _push_one_layer(registry, 1301)

    p = run_layerwarm("plan", ref, cache_dir=cache_dir)
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines()[0] == "1 image, 1 unique layer", p.stdout
    assert _last_line(p.stdout).startswith("to fetch from registry: 1 layer, "), p.stdout

    p = run_layerwarm("warm", ref, cache_dir=cache_dir)
    assert p.returncode == 0, p.stderr
    assert _last_line(p.stdout).startswith("1 layer: 1 from registry ("), p.stdout
    p = run_layerwarm("warm", ref, cache_dir=cache_dir)
    assert "1 cache hit, 0 failed" in _last_line(p.stdout), p.stdout

    p = run_layerwarm("ls", cache_dir=cache_dir)
    assert _last_line(p.stdout).startswith("1 entry, "), p.stdout
    p = run_layerwarm("usage", lay.digest, cache_dir=cache_dir)
    assert _last_line(p.stdout) == f"1 image uses {lay.digest} (on disk)", p.stdout
    p = run_layerwarm("verify", cache_dir=cache_dir)
    assert p.returncode == 0 and _last_line(p.stdout).startswith("1 entry: 1 ok"), p.stdout

    p = run_layerwarm("pin", ref, "--ttl", "1h", cache_dir=cache_dir)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith(f"pinned {ref}: 1 layer until "), p.stdout
    p = run_layerwarm("unpin", ref, cache_dir=cache_dir)
    assert p.stdout.strip() == f"unpinned {ref}: 1 layer", p.stdout

    p = run_layerwarm("gc", "--max-size", "0", "--grace", "0", cache_dir=cache_dir)
    assert p.returncode == 0, p.stderr
    assert "; evicted 1 layer, " in _last_line(p.stdout), p.stdout
    assert entries(cache_dir) == set()


def test_a_failed_image_is_named_in_the_stdout_summary(
    registry: RegistryServer, cache_dir: Path
) -> None:
    missing = f"{registry.host}/{_repo()}:nope"
    for command in ("warm", "plan"):
        p = run_layerwarm(command, missing, cache_dir=cache_dir)
        assert p.returncode == 1, (command, p.stdout, p.stderr)
        assert _last_line(p.stdout) == f"1 image failed: {missing}", (command, p.stdout)
        errors = [x for x in p.stderr.splitlines() if x.startswith("error:")]
        assert len(errors) == 1 and missing in errors[0], (command, p.stderr)
        assert "Traceback" not in p.stderr
    assert entries(cache_dir) == set()
    p = run_layerwarm("verify", cache_dir=cache_dir)
    assert p.returncode == 0, p.stdout


# ------------------------------------------------------------------ digest prefixes


def _warm_two(registry: RegistryServer, cache_dir: Path) -> tuple[Layer, Layer]:
    a = Layer(tar=random_tar(1311, 40_000), compression="gzip")
    b = Layer(tar=random_tar(1312, 40_000), compression="zstd")
    repo = _repo()
    registry.push_image(repo, "1.0", Image([a, b], format="oci"))
    p = run_layerwarm("warm", f"{registry.host}/{repo}:1.0", cache_dir=cache_dir)
    assert p.returncode == 0, p.stderr
    return a, b


def _hex(lay: Layer) -> str:
    return lay.digest.removeprefix("sha256:")


def test_commands_take_the_short_digest_warm_prints(
    registry: RegistryServer, cache_dir: Path
) -> None:
    a, b = _warm_two(registry, cache_dir)
    short = "sha256:" + _hex(a)[:12]  # what `warm` prints in its LAYER column

    p = run_layerwarm("inspect", short, cache_dir=cache_dir)
    assert p.returncode == 0, p.stderr
    assert f"digest        {a.digest}" in p.stdout, p.stdout
    p = run_layerwarm("usage", _hex(a)[:16], cache_dir=cache_dir)  # the bare hex, longer
    assert p.returncode == 0 and f"1 image uses {a.digest} (on disk)" in p.stdout, p.stdout
    p = run_layerwarm("verify", "sha256_" + _hex(b)[:12], cache_dir=cache_dir)
    assert p.returncode == 0 and f"ok           disk   {b.digest}" in p.stdout, p.stdout

    p = run_layerwarm("rm", short, cache_dir=cache_dir)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == f"removed {a.digest} from disk", p.stdout
    assert entries(cache_dir) == {"sha256_" + _hex(b)}
    assert (cache_dir / ("sha256_" + _hex(b))).read_bytes() == b.tar
    assert run_layerwarm("verify", cache_dir=cache_dir).returncode == 0


def test_an_ambiguous_or_unknown_prefix_is_refused_in_one_line(
    registry: RegistryServer, cache_dir: Path
) -> None:
    a, _ = _warm_two(registry, cache_dir)
    # A second entry name sharing a's first 12 hex (a real collision cannot be made).
    twin_hex = _hex(a)[:12] + "0" * 52 if _hex(a)[12:] != "0" * 52 else _hex(a)[:12] + "1" * 52
    twin = cache_dir / f"sha256_{twin_hex}"
    twin.write_bytes(b"not a layer")
    twin.chmod(0o600)
    real = cache_dir / ("sha256_" + _hex(a))
    before = {p: (p.read_bytes(), p.stat().st_mode) for p in (twin, real)}

    prefix = "sha256:" + _hex(a)[:12]
    for command in ("inspect", "usage", "rm", "verify"):
        p = run_layerwarm(command, prefix, cache_dir=cache_dir)
        assert p.returncode == 2, (command, p.stdout, p.stderr)
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and "ambiguous" in lines[0], (command, p.stderr)
        assert a.digest in lines[0] and f"sha256:{twin_hex}" in lines[0], lines
        assert p.stdout == "", (command, p.stdout)
    assert {p: (p.read_bytes(), p.stat().st_mode) for p in (twin, real)} == before

    for command in ("inspect", "rm"):
        p = run_layerwarm(command, "sha256:" + "f" * 12 if not _hex(a).startswith("f" * 12)
                          else "sha256:" + "e" * 12, cache_dir=cache_dir)
        assert p.returncode == 1, (command, p.stderr)
        assert p.stderr.strip().endswith("not in the cache"), p.stderr
        assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    for bad in ("sha256:" + _hex(a)[:11], "sha256:../../etc/passwd"):
        p = run_layerwarm("inspect", bad, cache_dir=cache_dir)
        assert p.returncode == 2 and "invalid digest" in p.stderr, (bad, p.stderr)
        assert "Traceback" not in p.stderr
    assert {p: (p.read_bytes(), p.stat().st_mode) for p in (twin, real)} == before


# ------------------------------------------------------------------ containers auth.json


def _auth_json(docker_config: Path, where: Path) -> Path:
    """podman/skopeo's auth.json: the same `auths` format as Docker's config.json."""
    where.parent.mkdir(parents=True, exist_ok=True)
    where.write_text((docker_config / "config.json").read_text())
    where.chmod(0o600)
    return where


def test_credentials_from_the_containers_auth_json(
    auth_registry: RegistryServer, docker_config: Path, tmp_path: Path
) -> None:
    lay = Layer(tar=random_tar(1321, 40_000), compression="gzip")
    repo = _repo()
    auth_registry.push_image(repo, "1", Image([lay]))
    ref = f"{auth_registry.host}/{repo}:1"
    authfile = _auth_json(docker_config, tmp_path / "mine" / "auth.json")
    runtime = tmp_path / "run-user"
    _auth_json(docker_config, runtime / "containers" / "auth.json")

    ways = {
        "flag": (("--authfile", str(authfile)), {}),
        "env": ((), {"REGISTRY_AUTH_FILE": str(authfile)}),
        "xdg": ((), {"XDG_RUNTIME_DIR": str(runtime)}),
    }
    for how, (flags, env) in ways.items():
        cache = tmp_path / f"cache-{how}"
        p = run_layerwarm("warm", *flags, ref, cache_dir=cache, env=env)
        assert p.returncode == 0, (how, p.stderr)
        assert (cache / ("sha256_" + _hex(lay))).read_bytes() == lay.tar, how
        assert "s3cret-pw" not in p.stdout + p.stderr
    p = run_layerwarm("plan", "--authfile", str(authfile), ref, cache_dir=tmp_path / "c-plan")
    assert p.returncode == 0 and p.stdout.startswith("1 image, 1 unique layer"), p.stderr
    p = run_layerwarm("pin", "--authfile", str(authfile), "--ttl", "1h", ref,
                      cache_dir=tmp_path / "cache-flag")
    assert p.returncode == 0 and p.stdout.startswith(f"pinned {ref}: 1 layer"), p.stderr

    # --authfile wins over REGISTRY_AUTH_FILE; a file that is not there is said in one line.
    missing = tmp_path / "nowhere" / "auth.json"
    p = run_layerwarm("warm", "--authfile", str(missing), ref, cache_dir=tmp_path / "c-missing",
                      env={"REGISTRY_AUTH_FILE": str(authfile)})
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip() == f"layerwarm: cannot read auth file {missing}: "\
        "No such file or directory", p.stderr
    assert entries(tmp_path / "c-missing") == set()


HABITS_DB = 15  # the worker test's fleet (flushed when it starts)


def test_a_worker_reads_the_authfile_it_is_given(
    auth_registry: RegistryServer, docker_config: Path, tmp_path: Path, redis_url: str,
    s3: S3Server,
) -> None:
    lay = Layer(tar=random_tar(1331, 40_000), compression="zstd")
    repo = _repo()
    auth_registry.push_image(repo, "1", Image([lay]))
    ref = f"{auth_registry.host}/{repo}:1"
    authfile = _auth_json(docker_config, tmp_path / "auth.json")
    broker = broker_url_for(redis_url, HABITS_DB)

    p = run_layerwarm("worker", "--node", "x", "--authfile", str(tmp_path / "none.json"),
                      cache_dir=tmp_path / "c-none", env={"LAYERWARM_BROKER_URL": broker})
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip() == (f"layerwarm: cannot read auth file {tmp_path / 'none.json'}: "
                                "No such file or directory"), p.stderr

    with running_fleet(tmp_path / "fleet", ["a"], broker, S3Tier.new(s3, "habits"), s3.env(),
                       worker_args={"a": ["--authfile", str(authfile)]}) as fleet:
        p = fleet.submit(ref, "--to", "node:a", "--wait")
        assert p.returncode == 0, f"{p.stdout}\n{p.stderr}\n{fleet.logs()}"
        got = fleet.cache_dir("a") / ("sha256_" + _hex(lay))
        assert got.read_bytes() == lay.tar
        assert "s3cret-pw" not in fleet.logs() + p.stdout + p.stderr


def _lan_name() -> str:
    """A registry name that is not loopback by its spelling (plain HTTP to it needs
    --insecure-registry) but reaches the test registry on 127.0.0.1: this host's name."""
    import socket

    name = socket.gethostname()
    try:
        addresses = {a[4][0] for a in socket.getaddrinfo(name, None, socket.AF_INET)}
    except OSError:
        addresses = set()
    # A machine without such a name cannot run this test: that fails, it is not skipped.
    assert name and name != "localhost" and addresses == {"127.0.0.1"}, (
        f"this host's name {name!r} must resolve to 127.0.0.1 only (/etc/hosts) for the "
        f"--insecure-registry test; it resolves to {sorted(addresses)}")
    return name


def test_a_worker_talks_plain_http_to_the_insecure_registries_it_is_given(
    registry: RegistryServer, tmp_path: Path, redis_url: str, s3: S3Server,
) -> None:
    lay = Layer(tar=random_tar(1341, 40_000), compression="gzip")
    repo = _repo()
    registry.push_image(repo, "1", Image([lay]))
    hostport = f"{_lan_name()}:{registry.host.rsplit(':', 1)[1]}"
    ref = f"{hostport}/{repo}:1"

    # Any worker may resolve a job's images, so the flag is given to the whole fleet (here
    # one host); without it the worker speaks TLS to that name and the job fails.
    with running_fleet(tmp_path / "fleet", ["a"], broker_url_for(redis_url, HABITS_DB),
                       S3Tier.new(s3, "habits-insecure"), s3.env(),
                       worker_args={"a": ["--insecure-registry", hostport]}) as fleet:
        p = fleet.submit(ref, "--to", "node:a", "--wait")
        assert p.returncode == 0, f"{p.stdout}\n{p.stderr}\n{fleet.logs()}"
        assert (fleet.cache_dir("a") / ("sha256_" + _hex(lay))).read_bytes() == lay.tar


def test_flower_warns_in_one_line_when_it_serves_without_login(
    tmp_path: Path, redis_url: str
) -> None:
    port = free_port()
    broker = broker_url_for(redis_url, HABITS_DB)  # a live one: a dead broker is refused first
    proc = subprocess.Popen(
        layerwarm_cmd("flower", "--port", str(port)),
        env=layerwarm_env(tmp_path / "cache", {"LAYERWARM_BROKER_URL": broker}),
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stderr is not None
        first = proc.stderr.readline().strip()  # printed before Flower starts
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        if proc.stderr is not None:
            proc.stderr.close()
    assert first.startswith(f"layerwarm: warning: Flower serves http://127.0.0.1:{port} "
                            "without login"), first
