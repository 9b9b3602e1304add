"""`layerwarm metrics` and the hit ratio of `layerwarm df`, after real warms against the real
registry (and a shared directory as the remote tier). Every value in a scrape is checked
against what the warms did: which tier had each layer and how many bytes moved."""

from __future__ import annotations

import json
import os
import sqlite3
import uuid
from pathlib import Path

from tests.support.cli import run_layerwarm
from tests.support.images import Image, Layer, random_tar
from tests.support.metrics import Scrape
from tests.support.registry import RegistryServer

HIST = "layerwarm_layer_materialize_seconds"


def _image(registry: RegistryServer, seed: int) -> tuple[str, list[Layer]]:
    layers = [
        Layer(random_tar(seed, 200_000), "gzip"),
        Layer(random_tar(seed + 1, 120_000), "zstd"),
        Layer(random_tar(seed + 2, 60_000), "none"),
    ]
    repo = f"metrics/{uuid.uuid4().hex[:10]}"
    registry.push_image(repo, "1", Image(layers))
    return f"{registry.host}/{repo}:1", layers


def _warm(ref: str, cache_dir: Path, *extra: str) -> None:
    p = run_layerwarm("warm", *extra, ref, cache_dir=cache_dir)
    assert p.returncode == 0, p.stderr


def _scrape(cache_dir: Path) -> Scrape:
    p = run_layerwarm("metrics", cache_dir=cache_dir)
    assert p.returncode == 0, p.stderr
    return Scrape(p.stdout)


def _df(cache_dir: Path) -> dict:
    p = run_layerwarm("df", "--json", cache_dir=cache_dir)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def _assert_histogram(m: Scrape, count: int) -> None:
    buckets = m.buckets(HIST)
    assert buckets[-1] == (float("inf"), count) and m(f"{HIST}_count") == count
    counts = [c for _, c in buckets]
    assert counts == sorted(counts), f"buckets are not cumulative: {buckets}"
    assert m(f"{HIST}_sum") > 0


def test_first_warm_misses_second_warm_hits_disk(registry: RegistryServer, cache_dir: Path) -> None:
    ref, layers = _image(registry, 900)
    _warm(ref, cache_dir)
    m = _scrape(cache_dir)
    assert m.types[HIST] == "histogram" and m.types["layerwarm_cache_hits"] == "counter"
    assert m("layerwarm_cache_misses_total", tier="disk") == 3
    assert m("layerwarm_cache_hits_total", tier="disk") == 0
    assert m("layerwarm_cache_misses_total", tier="remote") == 0, "no remote tier to miss"
    assert m("layerwarm_layers_materialized_total", source="registry") == 3
    assert m("layerwarm_bytes_fetched_total", source="registry") == sum(x.size for x in layers)
    assert m("layerwarm_bytes_fetched_total", source="remote") == 0
    assert m("layerwarm_bytes_published_total", tier="remote") == 0
    assert m("layerwarm_cache_entries") == 3
    assert m("layerwarm_cache_bytes") == sum(len(x.tar) for x in layers)
    assert m("layerwarm_evictions_total") == 0 and m("layerwarm_evicted_bytes_total") == 0
    _assert_histogram(m, 3)

    _warm(ref, cache_dir)
    m = _scrape(cache_dir)
    assert m("layerwarm_cache_hits_total", tier="disk") == 3
    assert m("layerwarm_cache_misses_total", tier="disk") == 3
    assert m("layerwarm_layers_materialized_total", source="disk") == 3
    assert m("layerwarm_bytes_fetched_total", source="registry") == sum(x.size for x in layers)
    _assert_histogram(m, 6)

    df = _df(cache_dir)
    assert df["hit_ratio"] == {
        "disk": 0.5,
        "overall": 0.5,
        "disk_hits": 3,
        "disk_lookups": 6,
        "cache_hits": 3,
        "layers": 6,
    }
    assert df["entries"] == 3 and "saved_bytes" in df, "the existing df fields stay"
    p = run_layerwarm("df", cache_dir=cache_dir)
    assert p.returncode == 0, p.stderr
    assert (
        "hit ratio      disk 50.0% (3 of 6 lookups), overall 50.0% (3 of 6 layers from "
        "a cache tier)"
    ) in p.stdout.splitlines()


def test_wiped_disk_refills_from_the_remote_tier(registry: RegistryServer, tmp_path: Path) -> None:
    ref, layers = _image(registry, 910)
    remote = f"file://{tmp_path / 'shared'}"
    first, second = tmp_path / "first", tmp_path / "second"
    _warm(ref, first, "--remote", remote)
    m = _scrape(first)
    for tier in ("disk", "remote"):
        assert m("layerwarm_cache_misses_total", tier=tier) == 3
    assert m("layerwarm_bytes_fetched_total", source="registry") == sum(x.size for x in layers)
    assert m("layerwarm_bytes_published_total", tier="remote") == sum(len(x.tar) for x in layers)

    _warm(ref, second, "--remote", remote)  # a fresh disk: every layer from the remote tier
    m = _scrape(second)
    assert m("layerwarm_cache_misses_total", tier="disk") == 3
    assert m("layerwarm_cache_hits_total", tier="remote") == 3
    assert m("layerwarm_cache_misses_total", tier="remote") == 0
    assert m("layerwarm_layers_materialized_total", source="remote") == 3
    assert m("layerwarm_bytes_fetched_total", source="remote") == sum(len(x.tar) for x in layers)
    assert m("layerwarm_bytes_fetched_total", source="registry") == 0
    assert m("layerwarm_bytes_published_total", tier="remote") == 0, "it was there already"
    _assert_histogram(m, 3)
    h = _df(second)["hit_ratio"]
    assert (h["disk"], h["overall"], h["cache_hits"], h["layers"]) == (0.0, 1.0, 3, 3)


def test_cache_bytes_count_a_hard_linked_entry_once_and_evictions_are_read(
    registry: RegistryServer, cache_dir: Path
) -> None:
    ref, layers = _image(registry, 920)
    _warm(ref, cache_dir)
    # Two digests of one content (gzip and zstd of the same tar) share one file.
    twin = "sha256_" + "ab" * 32
    os.link(cache_dir / ("sha256_" + layers[0].digest.removeprefix("sha256:")), cache_dir / twin)
    # What `gc` records when it evicts (another command's counters; read here, not written).
    with sqlite3.connect(cache_dir / ".meta.db") as db:
        db.executemany(
            "INSERT INTO counters VALUES (?, ?)", [("evictions", 2), ("evicted_bytes", 123456)]
        )
    m = _scrape(cache_dir)
    assert m("layerwarm_cache_entries") == 4
    assert m("layerwarm_cache_bytes") == sum(len(x.tar) for x in layers)
    assert m("layerwarm_evictions_total") == 2
    assert m("layerwarm_evicted_bytes_total") == 123456


def test_a_cache_never_made_reads_as_zeros_and_stays_unmade(tmp_path: Path) -> None:
    cache_dir = tmp_path / "never"
    m = _scrape(cache_dir)
    assert m("layerwarm_cache_entries") == 0 and m(f"{HIST}_count") == 0
    assert m("layerwarm_cache_misses_total", tier="disk") == 0
    assert _df(cache_dir)["hit_ratio"]["disk"] is None
    p = run_layerwarm("df", cache_dir=cache_dir)
    assert "hit ratio      disk - (0 of 0 lookups), overall - (0 of 0 layers" in p.stdout
    assert not cache_dir.exists(), "reading must not create the cache"


def test_a_failing_count_fails_no_warm_and_counts_nothing_of_its_layer(
    registry: RegistryServer, cache_dir: Path
) -> None:
    ref, _ = _image(registry, 930)
    _warm(ref, cache_dir)
    with sqlite3.connect(cache_dir / ".meta.db") as db:  # the histogram's rows refuse writes
        db.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON counters "
            "WHEN NEW.name LIKE 'materialize_seconds%' BEGIN SELECT RAISE(ABORT, 'no'); END"
        )
    p = run_layerwarm("warm", ref, cache_dir=cache_dir)
    assert p.returncode == 0, p.stderr
    assert "metadata counters" in p.stderr and "failed" in p.stderr
    m = _scrape(cache_dir)
    # One transaction per warm: the hits written before the refused row were rolled back.
    assert m("layerwarm_cache_hits_total", tier="disk") == 0
    assert m("layerwarm_layers_materialized_total", source="disk") == 0
    assert m(f"{HIST}_count") == 3
