"""The benchmark's workload is deterministic from its seed (issue 5), on a scale small
enough for a test: the same (scale, seed) gives the same images, byte for byte; another
seed gives other generated layers; every blob is what its digest and diff_id say."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import zstandard

from bench.workload import MiB, Scale, build

TINY = Scale("test", base_bytes=1 * MiB, runtime_bytes=256 << 10, apps=2, app_min=64 << 10,
             app_max=256 << 10, big_bytes=1 * MiB, tiny_images=2, tiny_layers=3,
             corpus_bytes=1 * MiB)


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def test_same_seed_same_images_other_seed_other_layers(tmp_path: Path) -> None:
    first, again = build(TINY, seed=7), build(TINY, seed=7)
    assert first.digests() == again.digests()
    assert {k: x.digest for k, x in first.layers.items()} == {
        k: x.digest for k, x in again.layers.items()}

    other = build(TINY, seed=8)
    assert set(other.images) == set(first.images), "the image names do not depend on the seed"
    both = set(first.layers) & set(other.layers)  # the seed also picks how many app layers
    changed = [k for k in both if first.layers[k].digest != other.layers[k].digest]
    assert any(key.startswith("tiny") for key, _ in changed), "generated layers ignore the seed"

    cached = build(TINY, seed=7, cache_dir=tmp_path / "cache")  # built to disk, then loaded
    assert cached.digests() == first.digests()
    assert build(TINY, seed=7, cache_dir=tmp_path / "cache").digests() == first.digests()


def test_every_blob_matches_its_digest_and_diff_id() -> None:
    w = build(TINY, seed=3)
    inflate = {"gzip": gzip.decompress,
               "zstd": lambda b: zstandard.ZstdDecompressor().decompressobj().decompress(b)}
    assert {c for _, c in w.layers} == {"gzip", "zstd"}
    for lay in w.layers.values():
        blob = lay.blob
        assert _sha(blob) == lay.digest and len(blob) == lay.size
        tar = inflate[lay.compression](blob)
        assert _sha(tar) == lay.diff_id and len(tar) == lay.uncompressed_size
