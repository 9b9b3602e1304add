"""Scenario 11's children, run as the bench runs them: the stage with its index commits the
layer and its index and reports the index's own cost; the stage without commits no index."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.digest import Digest
from pipeline.tiers.disk import DiskTier
from tests.support.images import Layer
from tests.support.tars import File, make_tar

REPO = Path(__file__).resolve().parent.parent


def _stage(mode: str, root: Path, layer: Layer) -> dict[str, float]:
    disk = DiskTier(root)
    staging = disk.staging_path(Digest.parse(layer.digest))
    staging.parent.mkdir(parents=True)
    staging.write_bytes(layer.blob)
    r = subprocess.run([sys.executable, "-m", "bench.children", mode, str(root), layer.digest,
                        layer.diff_id, layer.media_type, str(layer.size)],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.mark.parametrize("mode", ["decompress", "decompress-noindex"])
def test_the_decompress_children_commit_the_layer_and_say_what_it_cost(
        tmp_path: Path, mode: str) -> None:
    tar = make_tar([File(f"usr/lib/f{i}", bytes([i]) * (3000 + i)) for i in range(40)])
    layer = Layer(tar)
    out = _stage(mode, tmp_path, layer)
    hex_ = layer.digest.split(":")[1]
    assert out["size"] == len(tar)
    assert (tmp_path / f"sha256_{hex_}").read_bytes() == tar
    assert out["seconds"] > 0
    if mode == "decompress":
        assert (tmp_path / ".index" / f"sha256_{hex_}").is_file()
        assert out["index_seconds"] > 0
    else:
        assert not (tmp_path / ".index").exists()
        assert "index_seconds" not in out
