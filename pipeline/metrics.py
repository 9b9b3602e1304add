"""The cache in Prometheus text: `layerwarm metrics` and the worker's `--metrics-port`.

The one module that imports prometheus_client. A collector reads the running totals in
`.meta.db` (pipeline/stats.py) and the cache directory at each scrape, so every process
that warms into the directory, and every restart, adds to the same numbers:

    layerwarm_cache_hits_total{tier}              disk / remote
    layerwarm_cache_misses_total{tier}            disk / remote
    layerwarm_layers_materialized_total{source}   disk / link / remote / registry
    layerwarm_bytes_fetched_total{source}         registry (compressed) / remote
    layerwarm_bytes_published_total{tier}         remote
    layerwarm_layer_materialize_seconds           histogram
    layerwarm_evictions_total, layerwarm_evicted_bytes_total    (bumped by gc)
    layerwarm_cache_entries, layerwarm_cache_bytes              gauges, from the files
    layerwarm_metadata_bytes                                    gauge, .meta.db and its WAL

Reading never creates the cache directory or its database: a cache not made yet is all 0.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from pipeline import stats
from pipeline.tiers.disk import DiskTier


def disk_usage(disk: DiskTier) -> tuple[int, int]:
    """(entries, bytes) on disk; an inode named by several entries (hard links) counts once."""
    inodes: dict[tuple[int, int], int] = {}
    count = 0
    for digest in disk.entries():
        try:
            st = os.stat(disk.path(digest))
        except FileNotFoundError:
            continue  # removed while we looked
        count += 1
        inodes[(st.st_dev, st.st_ino)] = st.st_size
    return count, sum(inodes.values())


class CacheCollector(Collector):
    """Everything about one cache directory, read fresh at every scrape."""

    def __init__(self, disk: DiskTier) -> None:
        self.disk = disk

    def collect(self) -> Iterator[Metric]:
        counters = self.disk.meta.counters()
        yield from _counter_families(lambda name: counters.get(name, 0.0))
        yield from self._gauges()

    def _gauges(self) -> Iterator[Metric]:
        """What the cache holds now, read from the directory and the database's files."""
        entries, size = disk_usage(self.disk)
        yield GaugeMetricFamily("layerwarm_cache_entries", "Entries on disk.", value=entries)
        yield GaugeMetricFamily(
            "layerwarm_cache_bytes",
            "Bytes of the entries on disk, each hard-linked file once.",
            value=size,
        )
        yield GaugeMetricFamily(
            "layerwarm_metadata_bytes",
            "Bytes .meta.db takes on disk (with its -wal and -shm), stored configs included.",
            value=self.disk.meta.usage().bytes,
        )


# Counters kept per tier or source: metric name, help, label, its values, stored name.
_LABELLED = (
    ("layerwarm_cache_hits", "Layer lookups a cache tier answered.",
     "tier", stats.TIERS, "cache_hits"),
    ("layerwarm_cache_misses", "Layer lookups a cache tier could not answer.",
     "tier", stats.TIERS, "cache_misses"),
    ("layerwarm_layers_materialized", "Layers made present, by where they came from.",
     "source", stats.SOURCES, "materialized"),
    ("layerwarm_bytes_fetched",
     "Bytes fetched: compressed blobs from the registry, entries from the remote tier.",
     "source", ("registry", "remote"), "bytes_fetched"),
)


def _counter_families(value: Callable[[str], float]) -> Iterator[Metric]:
    """The running totals .meta.db keeps (pipeline/stats.py), as Prometheus families."""
    for name, doc, label, keys, stored in _LABELLED:
        family = CounterMetricFamily(name, doc, labels=[label])
        for key in keys:
            family.add_metric([key], value(f"{stored}.{key}"))
        yield family
    published = CounterMetricFamily(
        "layerwarm_bytes_published", "Bytes uploaded to the remote tier.", labels=["tier"]
    )
    published.add_metric(["remote"], value(stats.PUBLISHED))
    yield published
    buckets = [(f"{b:g}", value(stats.bucket_name(b))) for b in stats.BUCKETS]
    buckets.append(("+Inf", value(f"{stats.SECONDS}.count")))
    yield HistogramMetricFamily(
        "layerwarm_layer_materialize_seconds",
        "Seconds from looking a layer up to having it on disk (and published).",
        buckets=buckets,
        sum_value=value(f"{stats.SECONDS}.sum"),
    )
    yield CounterMetricFamily(
        "layerwarm_evictions", "Entries evicted by gc.", value=value("evictions")
    )
    yield CounterMetricFamily(
        "layerwarm_evicted_bytes", "Bytes evicted by gc.", value=value("evicted_bytes")
    )


def registry_for(disk: DiskTier) -> CollectorRegistry:
    """A private registry with only this cache in it (no process or platform metrics)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(CacheCollector(disk))
    return registry


def render(disk: DiskTier) -> str:
    """The Prometheus text exposition of the cache, as `layerwarm metrics` prints it."""
    return generate_latest(registry_for(disk)).decode()


def serve(disk: DiskTier, port: int, address: str) -> WSGIServer:
    """Serve `/metrics` for the cache on a daemon thread, for as long as the process runs.

    Raises OSError when the address cannot be bound (e.g. the port is taken).
    """
    server, _thread = start_http_server(port, address, registry=registry_for(disk))
    return server
