"""containerd as a peer (issue 16, item 3): 1c, the big gzip image, and 4c, the 12-image gzip
fleet one image after another, each against layerwarm's cold `warm` of the same images.

The peer is `ctr images pull --plain-http --snapshotter overlayfs` (fetch + verify + unpack
into snapshots) on a containerd the bench starts itself (``bench.containerd``), restarted
on an empty root before every pull (not timed). Page cache dropped before each side.
Where containerd or ctr is missing, the row says so and is not met: no figure is made up.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from bench import containerd
from bench.measure import CommandFailed
from bench.scenarios.base import BenchBase, Row
from bench.workload import MiB


class ContainerdScenarios(BenchBase):
    """Scenarios 1c and 4c."""

    snapshotter = "overlayfs"

    def cold_warm_seconds(self, names: Sequence[str], tag: str) -> float:
        """layerwarm's side: a cold `warm` of ``names`` into an empty disk tier."""
        layers = self.w.unique_layers(list(names))
        cache = self.dir(tag)
        self.cold_start()
        r, rep = self.warm(names, cache)
        if rep["totals"]["from_registry"] != len(layers):
            raise AssertionError(f"expected {len(layers)} layers from the registry: "
                                 f"{rep['totals']}")
        self.check_entries(cache, layers)
        self.rm(cache)
        return r.seconds

    def versus_containerd(self, num: str, title: str, names: Sequence[str], parallel: int,
                          limit: float) -> Row:
        row = Row(num, title)
        why = containerd.missing()
        if why:
            row.met = False
            row.notes.append(why)
            return row
        layers = self.w.unique_layers(list(names))
        refs = self.refs(names)
        ctrd = containerd.Containerd(self.scratch / "ctrd")
        checked: list[str] = []

        def peer(i: int) -> float:
            ctrd.fresh()  # an empty root: no content, no snapshots (not timed)
            self.cold_start()
            t0 = time.perf_counter()
            for ref in refs:  # one process per image, one after another, as a node does
                try:
                    ctrd.pull(ref, self.snapshotter)
                except CommandFailed as e:
                    if self.snapshotter != "overlayfs" or i or ref != refs[0]:
                        raise
                    # overlayfs refused here (nested overlay, kernel): native, and say so
                    row.notes.append(f"overlayfs failed, native used: {str(e)[-300:]}")
                    self.snapshotter = "native"
                    return peer(i)
            seconds = time.perf_counter() - t0
            if not checked:
                checked.append(ctrd.check_unpacked(refs, self.snapshotter, len(layers)))
            return seconds

        try:
            samples = self.paired(lambda i: self.cold_warm_seconds(names, f"s{num}-lw"), peer)
        finally:
            ctrd.stop()
        self.ratio_row(row, samples, "<=", limit)
        row.notes.insert(0, (
            f"{len(names)} image(s), {len(layers)} unique layers, "
            f"{sum(x.size for x in layers) / MiB:.0f} MiB gzip → "
            f"{sum(x.uncompressed_size for x in layers) / MiB:.0f} MiB tar; peer: containerd "
            f"{containerd.version()} (its own root, state and socket, CRI plugin disabled, "
            f"restarted on an empty root before each pull, restart not timed): `ctr images "
            f"pull --plain-http --snapshotter {self.snapshotter}` of each image, one process "
            f"after another (fetch + verify + unpack); layerwarm: cold `warm`, disk tier"))
        row.notes.extend(checked)
        self.floor_ratio(row, self.floor(names, cold=True, parallel=parallel))
        return row

    def s1c(self) -> Row:
        return self.versus_containerd(
            "1c", "cold `warm` of the big gzip image vs containerd pull + unpack",
            [self.w.big["gzip"]], 1, 0.20)

    def s4c(self) -> Row:
        names = self.w.fleet["gzip"]
        return self.versus_containerd(
            "4c", f"cold `warm` of the {len(names)}-image gzip fleet vs containerd, "
            "one image after another", names, self.nproc, 0.20)
