"""What happened to the layers this cache materialized, as running totals in `.meta.db`.

Every materialized layer adds (one small transaction per worker task, or per embedded warm):

    materialized.<source>         1, source disk / link / remote / registry (where it came
                                  from; link: the same content on disk under another digest)
    cache_hits.<tier>             1 for the tier that had it (disk or remote; a link is a
                                  disk hit by content)
    cache_misses.<tier>           1 for each tier looked in first that lacked it
    bytes_fetched.<source>        compressed bytes from the registry, bytes from the remote tier
    bytes_published.remote        bytes uploaded to the remote tier
    materialize_seconds.count     a histogram of the seconds it took: count, sum and one
    materialize_seconds.sum       cumulative count per bucket bound ("le" like Prometheus)
    materialize_seconds.le.<b>

`pipeline/metrics.py` turns these into Prometheus text and `df` into hit ratios. Counting
is bookkeeping: a failure to count is logged and never fails the layer it counts.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from pipeline.layer import LayerResult, Source
from pipeline.metadata import Metadata

TIERS = ("disk", "remote")
SOURCES: tuple[Source, ...] = ("disk", "link", "remote", "registry")
# From a disk hit (milliseconds) to a multi-GiB layer from a slow registry (minutes).
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
           300.0, 600.0)  # fmt: skip
SECONDS = "materialize_seconds"
PUBLISHED = "bytes_published.remote"


def bucket_name(bound: float) -> str:
    return f"{SECONDS}.le.{bound:g}"


def layer_counts(
    source: Source,
    *,
    missed: Iterable[str] = (),
    fetched_bytes: int = 0,
    published_bytes: int = 0,
    seconds: float | None = None,
) -> dict[str, float]:
    """The increments for one layer that came from `source` after `missed` tiers lacked it.

    `fetched_bytes` is what came over the network from `source` (0 for a disk hit);
    `seconds` is None when the layer's time is not known here (it is then not observed).
    """
    counts: dict[str, float] = {f"materialized.{source}": 1}
    if source != "registry":
        counts[f"cache_hits.{'disk' if source == 'link' else source}"] = 1
    for tier in missed:
        counts[f"cache_misses.{tier}"] = 1
    if fetched_bytes and source in ("remote", "registry"):
        counts[f"bytes_fetched.{source}"] = fetched_bytes
    if published_bytes:
        counts[PUBLISHED] = published_bytes
    if seconds is not None:
        counts[f"{SECONDS}.count"] = 1
        counts[f"{SECONDS}.sum"] = seconds
        counts.update((bucket_name(b), 1) for b in BUCKETS if seconds <= b)
    return counts


def result_counts(result: LayerResult, *, has_remote: bool) -> dict[str, float]:
    """The increments for one layer the embedded runner materialized (`Chain.materialize`).

    It looks disk -> remote (when configured) -> registry, so what it missed follows from
    where the layer came from. A failed layer counts nothing.
    """
    if result.source is None:
        return {}
    source = result.source
    missed = {"disk": (), "link": (), "remote": ("disk",), "registry": ("disk", "remote")}[source]
    if not has_remote:
        missed = tuple(t for t in missed if t != "remote")
    fetched = {"disk": 0, "link": 0, "remote": result.uncompressed_size or 0,
               "registry": result.layer.size}
    return layer_counts(
        source,
        missed=missed,
        fetched_bytes=fetched[source],
        published_bytes=(result.uncompressed_size or 0) if result.published else 0,
        seconds=result.seconds,
    )


def total(counts: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """Several layers' increments as one (histogram buckets add up like the rest)."""
    out: dict[str, float] = {}
    for one in counts:
        for name, amount in one.items():
            out[name] = out.get(name, 0) + amount
    return out


def record(meta: Metadata, counts: Mapping[str, float]) -> None:
    """Add `counts` in one transaction; never raises for a database problem."""
    if counts:
        meta.bump_many(counts)


@dataclass(frozen=True)
class HitRatio:
    """How often a cache tier had a layer, from the running totals."""

    disk_hits: int
    disk_lookups: int  # disk hits + disk misses
    cache_hits: int  # layers from disk or the remote tier
    layers: int  # layers materialized from anywhere

    @property
    def disk(self) -> float | None:
        """Disk hits / disk lookups; None before the first lookup."""
        return self.disk_hits / self.disk_lookups if self.disk_lookups else None

    @property
    def overall(self) -> float | None:
        """Layers served by a cache tier (disk or remote) / all layers; not the registry."""
        return self.cache_hits / self.layers if self.layers else None


def hit_ratio(counters: Mapping[str, float]) -> HitRatio:
    def n(name: str) -> int:
        return int(counters.get(name, 0))

    return HitRatio(
        disk_hits=n("cache_hits.disk"),
        disk_lookups=n("cache_hits.disk") + n("cache_misses.disk"),
        cache_hits=n("materialized.disk") + n("materialized.link") + n("materialized.remote"),
        layers=sum(n(f"materialized.{s}") for s in SOURCES),
    )
