"""The image fleet on one machine: cold `warm` (4), bytes fetched against the unique
layers (5), and `warm` again with everything on disk (6)."""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor

from bench.measure import RunResult, median, run
from bench.scenarios.base import TIMEOUT, BenchBase, Row, check_target
from bench.workload import MiB


class FleetScenarios(BenchBase):
    """Scenarios 4, 5 and 6. 6 reuses the cache the last run of 4 left (``fleet_cache``)."""

    def s4(self) -> Row:
        names = self.w.fleet["gzip"]
        layers = self.w.unique_layers(names)
        row = Row(4, f"cold `warm` of the {len(names)}-image gzip fleet, disk tier")
        row.notes.append(
            f"{len(layers)} unique layers, {sum(x.size for x in layers) / MiB:.0f} MiB gzip → "
            f"{sum(x.uncompressed_size for x in layers) / MiB:.0f} MiB tar; peer: skopeo copy "
            f"of the images 4 at a time into one OCI layout, then `pigz -dc` of each unique "
            f"layer to a file, {self.nproc} at a time (nproc)"
        )
        parts: list[tuple[float, float]] = []
        runs: list[RunResult] = []

        def lw(i: int) -> float:
            self.rm(self.fleet_cache)
            cache = self.dir(f"s4-lw-{i}")
            self.cold_start()
            r, rep = self.warm(names, cache)
            if rep["totals"]["from_registry"] != len(layers):
                raise AssertionError(f"expected {len(layers)} layers from the registry: "
                                     f"{rep['totals']}")
            self.check_entries(cache, layers)
            self.fleet_cache = cache  # kept for scenario 6
            runs.append(r)
            return r.seconds

        def peer(i: int) -> float:
            root = self.dir("s4-peer")
            layout, out = root / "oci", root / "out"
            out.mkdir()
            self.cold_start()
            t0 = time.perf_counter()
            with ThreadPoolExecutor(4) as pool:
                list(pool.map(lambda n: self.skopeo_copy(n, layout), names))
            t1 = time.perf_counter()
            self.unpack(layout, layers, out, self.nproc)
            t2 = time.perf_counter()
            parts.append((t1 - t0, t2 - t1))
            self.check_peer(out, layers, full=(i == 0))
            self.rm(root)
            return t2 - t0

        self.ratio_row(row, self.paired(lw, peer), "<=", 0.55)  # issue 16
        self.floor_ratio(row, self.floor(names, cold=True, parallel=self.nproc))
        sk, un = (median([p[k] for p in parts]) for k in range(2))
        row.notes.append(f"peer split: skopeo copies {sk:.2f} s + pigz {un:.2f} s")
        row.notes.append(self.cpu_note([("`layerwarm warm`", runs)]))
        if self.skopeo_retries:
            row.notes.append(f"{self.skopeo_retries} skopeo copies failed on the layout's "
                             "index.json race (EOF) and were run again, within the peer's time")
        row.notes.append(
            "skopeo 1.9 does not lock the layout's index.json: parallel copies into one "
            "layout keep only some tags in it, but every blob lands, which is all the "
            "peer needs"
        )
        return row
    def s5(self) -> Row:
        from tests.support.proxy import Proxy

        names = self.w.fleet["gzip"]
        layers = self.w.unique_layers(names)
        wanted = {x.digest for x in layers}
        unique = sum(x.size for x in layers)
        row = Row(5, "same fleet: bytes fetched from the registry / bytes of unique layers")
        pattern = re.compile(r"/blobs/(sha256:[0-9a-f]{64})")

        def fetched(proxy: Proxy) -> tuple[int, int, int]:
            layer_bytes = other = gets = 0
            for h in proxy.requests_log:
                m = pattern.search(h.path)
                if h.method == "GET" and m and m.group(1) in wanted:
                    layer_bytes += h.bytes_sent
                    gets += 1
                elif h.method == "GET":
                    other += h.bytes_sent
            return layer_bytes, other, gets

        proxy = Proxy(self.reg.url)
        try:
            cache = self.dir("s5-lw")
            self.warm(names, cache, host=proxy.host)
            self.check_entries(cache, layers)
            self.rm(cache)
            lw_bytes, lw_other, lw_gets = fetched(proxy)
        finally:
            proxy.stop()
        # skopeo sends several Accept headers, which the tests' proxy folds into one (so
        # the registry refuses it the OCI manifest): count skopeo's blob GETs from its
        # debug log instead (a GET without Range fetches the whole blob).
        layout = self.dir("s5-peer") / "oci"
        sizes = {x.digest: x.size for x in layers}
        get_line = re.compile(r'msg="GET [^"]*/blobs/(sha256:[0-9a-f]{64})"')

        def copy(n: str) -> list[str]:
            tag = n.split("/", 1)[1].replace(":", "-")
            r = run(["skopeo", "--debug", "copy", "--src-tls-verify=false",
                     f"docker://{self.reg.host}/{n}", f"oci:{layout}:{tag}"], timeout=TIMEOUT)
            return get_line.findall(r.stderr)

        with ThreadPoolExecutor(4) as pool:
            gets = [d for found in pool.map(copy, names) for d in found if d in sizes]
        self.rm(layout.parent)
        sk_bytes, sk_gets = sum(sizes[d] for d in gets), len(gets)
        ratio = lw_bytes / unique
        row.lw = f"{ratio:.2f}"
        row.peer = f"{sk_bytes / unique:.2f}"
        row.ratio = f"{ratio:.2f}"
        row.target = "= 1.00"
        row.met = check_target(ratio, "=", 1.0)
        row.data.update(layerwarm_bytes=lw_bytes, unique_bytes=unique, skopeo_bytes=sk_bytes)
        row.notes.append(
            f"measured once through the tests' counting proxy: layerwarm GET {lw_gets} layer "
            f"blobs, {lw_bytes / MiB:.1f} MiB for {len(layers)} unique layers of "
            f"{unique / MiB:.1f} MiB (+ {lw_other / 1024:.0f} KiB of manifests and configs); "
            f"the peer column is skopeo copying the images 4 at a time into one layout "
            f"({sk_gets} layer GETs, {sk_bytes / MiB:.1f} MiB, counted from `skopeo --debug`), "
            "for comparison"
        )
        return row
    def s6(self) -> Row:
        names = self.w.fleet["gzip"]
        layers = self.w.unique_layers(names)
        row = Row(6, "warm again, everything on disk")
        row.notes.append(
            "layerwarm: `warm` of the fleet with every layer already on disk (page cache "
            "warm); peer: `skopeo inspect` of each image, one after another"
        )
        cache = self.fleet_cache
        if cache is None or not cache.exists():
            cache = self.dir("s6-cache")
            self.warm(names, cache)
            self.fleet_cache = cache

        def lw(i: int) -> float:
            r, rep = self.warm(names, cache)
            if rep["totals"]["cache_hits"] != len(layers):
                raise AssertionError(f"expected only disk hits: {rep['totals']}")
            return r.seconds

        def peer(i: int) -> float:
            t0 = time.perf_counter()
            for n in names:
                run(["skopeo", "inspect", "--tls-verify=false", f"docker://{self.reg.host}/{n}"])
            return time.perf_counter() - t0

        return self.ratio_row(row, self.paired(lw, peer), "<=", 0.80)
