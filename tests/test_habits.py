"""The habits of the ecosystem (issue 13 item 4), through the real CLI.

Counts read as English ("1 layer", "evicted 1 layer") and a failed image is named in the
stdout summary, not only on stderr.
"""

from __future__ import annotations

import uuid
from pathlib import Path

from tests.support.cli import entries, run_layerwarm
from tests.support.images import Image, Layer, random_tar
from tests.support.registry import RegistryServer


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
