"""Read Prometheus text the way Prometheus would: with prometheus_client's own parser.

``Scrape(text)("layerwarm_cache_hits_total", tier="disk")`` is one sample's value; a
sample that is not there raises KeyError, so a test cannot pass on a missing metric.
"""

from __future__ import annotations

import math

from prometheus_client.parser import text_string_to_metric_families


class Scrape:
    def __init__(self, text: str) -> None:
        self.text = text
        self.types: dict[str, str] = {}
        self.samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        for family in text_string_to_metric_families(text):
            self.types[family.name] = family.type
            for s in family.samples:
                self.samples[(s.name, frozenset(s.labels.items()))] = s.value

    def __call__(self, name: str, **labels: str) -> float:
        return self.samples[(name, frozenset(labels.items()))]

    def buckets(self, histogram: str) -> list[tuple[float, float]]:
        """(upper bound, cumulative count) of a histogram, in bound order, +Inf last."""
        out = [
            (float(dict(labels)["le"]), value)
            for (name, labels), value in self.samples.items()
            if name == f"{histogram}_bucket"
        ]
        return sorted(out, key=lambda b: (math.isinf(b[0]), b[0]))
