"""What every scenario family shares: the result row, the targets, and BenchBase (the
workload, the servers, scratch space, running a side, pairing the sides, the ratio row).

Every figure is the wall time of real processes (``bench.measure.run``) on the same data
in the same run. Each run measures both sides back to back, alternating which goes first;
the ratio reported is the median of the per-run ratios (layerwarm / peer), and the times
shown are the medians of each side. Where a scenario says "cold", the page cache is
dropped before each side (when this machine allows it; see ``BenchBase.cold``).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import REPO_ROOT
from bench import floor as floors
from bench.measure import (
    CommandFailed,
    CpuUse,
    RunResult,
    can_drop_caches,
    drop_caches,
    median,
    run,
)
from bench.services import RedisServer
from bench.workload import BuiltLayer, Workload, _log
from pipeline.digest import digest_of_file
from tests.support.cli import layerwarm_cmd, layerwarm_env
from tests.support.registry import RegistryServer

BUCKET = "layerwarm-bench"
IO_THREADS = 16  # layerwarm's default --io-threads; the S3 peer uses as many
TIMEOUT = 3600


@dataclass
class Row:
    num: int | str  # the scenario id (bench.scenarios.SCENARIOS): 1 ... 15, 1c, S1
    title: str
    lw: str = "—"
    peer: str = "—"
    ratio: str = "—"
    floor: str = "—"  # layerwarm / the machine's floor (bench.floor), per run
    target: str = ""
    met: bool | None = None
    notes: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)


def _fmt_s(seconds: float) -> str:
    return f"{seconds:.2f} s"


def check_target(value: float, op: str, limit: float) -> bool:
    if op == "<=":
        return value <= limit + 1e-9
    if op == ">=":
        return value >= limit - 1e-9
    return round(value, 2) == round(limit, 2)


MET_SHARE = 0.6  # of the runs that must meet a target, besides their median


def judged(values: Sequence[float], op: str, limit: float) -> bool:
    """The one rule for "met": the median of the per-run values meets the target, and so
    do at least 60 % of the runs (a median on the line with a wide spread is not met)."""
    if not values:
        return False
    share = sum(check_target(v, op, limit) for v in values) / len(values)
    return check_target(median(values), op, limit) and share >= MET_SHARE - 1e-9


def spread(values: Sequence[float], fmt: str = "{:.2f}") -> str:
    """`median (min–max)` of per-run values, as every row shows them."""
    if len(values) < 2:
        return fmt.format(median(values)) if values else "—"
    return (f"{fmt.format(median(values))} "
            f"({fmt.format(min(values))}–{fmt.format(max(values))})")


def paired_runs(
    runs: int,
    lw: Callable[[int], float],
    peer: Callable[[int], float],
    pairs: int = 1,
) -> tuple[list[float], list[float], list[float]]:
    """Per-run (layerwarm, peer, ratio) samples: each run measures both sides back to back,
    alternating which goes first. With ``pairs`` > 1 a run is that many such pairs, and its
    samples are their medians (its ratio the median of the pairs' ratios): for a scenario
    whose effect is smaller than one pair's noise on this machine (11)."""
    lws, peers, ratios = [], [], []
    turn = 0
    for i in range(runs):
        got: list[tuple[float, float]] = []
        for _ in range(pairs):
            if turn % 2 == 0:
                a = lw(i)
                b = peer(i)
            else:
                b = peer(i)
                a = lw(i)
            turn += 1
            got.append((a, b))
        a, b = median([x for x, _ in got]), median([y for _, y in got])
        ratio = median([x / y for x, y in got])
        lws.append(a)
        peers.append(b)
        ratios.append(ratio)
        each = f" (median of {pairs} pairs)" if pairs > 1 else ""
        _log(f"  run {i + 1}: layerwarm {a:.2f}s, peer {b:.2f}s, ratio {ratio:.2f}{each}")
    return lws, peers, ratios


class BenchBase:
    """State shared by the scenarios: workload, servers, scratch space, samples."""

    def __init__(
        self, workload: Workload, registry: RegistryServer, runs: int, scratch: Path
    ) -> None:
        self.w = workload
        self.reg = registry
        self.runs = runs
        self.scratch = scratch
        self.nproc = os.cpu_count() or 2
        self.cold = can_drop_caches()
        self.rss_kib: dict[str, list[int]] = {}
        self.fleet_cache: Path | None = None  # the last cold fleet warm, for scenario 6
        self.skopeo_retries = 0  # copies run again after skopeo's index.json race
        self._s3: Any = None
        self._redis: RedisServer | None = None
        self._floors: dict[tuple[object, ...], floors.Floor] = {}
    def close(self) -> None:
        self.close_s3()
        if self._redis is not None:
            self._redis.stop()

    def close_s3(self) -> None:
        if self._s3 is not None:
            self._s3.cleanup()
            self._s3 = None

    @property
    def s3(self) -> Any:
        if self._s3 is None:
            from tests.support.s3 import S3Server

            self._s3 = S3Server().start()
            self._s3.create_bucket(BUCKET)
        return self._s3

    @property
    def redis(self) -> RedisServer:
        if self._redis is None:
            self._redis = RedisServer(self.scratch / "redis").start()
        return self._redis

    def dir(self, name: str) -> Path:
        path = self.scratch / name
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path

    def rm(self, *paths: Path | None) -> None:
        for p in paths:
            if p is not None:
                shutil.rmtree(p, ignore_errors=True)

    def cold_start(self) -> None:
        if self.cold:
            drop_caches()

    def refs(self, names: Sequence[str], host: str | None = None) -> list[str]:
        return [f"{host or self.reg.host}/{n}" for n in names]

    def warm(
        self,
        names: Sequence[str],
        cache: Path,
        *,
        remote: str | None = None,
        host: str | None = None,
    ) -> tuple[RunResult, dict[str, Any]]:
        """`layerwarm warm --json REFS` in a child process; raises unless all is warm."""
        argv = layerwarm_cmd("warm", "--json", *self.refs(names, host))
        extra = {}
        if remote:
            argv += ["--remote", remote]
            extra = self.s3.env() if remote.startswith("s3://") else {}
        r = run(argv, env=layerwarm_env(cache, extra), cwd=REPO_ROOT, timeout=TIMEOUT,
                watch=self.servers())
        report = json.loads(r.stdout)
        if not report.get("ok"):
            raise CommandFailed(f"layerwarm warm reported failures: {r.stdout[-3000:]}")
        return r, report

    def servers(self) -> dict[str, int]:
        """The servers running now, by name -> pid, whose CPU a timed command counts."""
        found = {"registry": self.reg.pid, "moto_server": self._s3.pid if self._s3 else None}
        return {name: pid for name, pid in found.items() if pid is not None}

    def cpu_note(self, sides: Sequence[tuple[str, Sequence[RunResult]]]) -> str:
        """Where the cores went while each side's timed command ran, medians over runs:
        the command's own CPU, each server's, and the whole machine's share of busy."""
        parts = []
        for label, results in sides:
            uses: list[CpuUse] = [r.cpu for r in results]
            busy = median([u.machine / (r.seconds * self.nproc) for u, r in zip(uses, results,
                                                                            strict=True)])
            servers = sorted({name for u in uses for name in u.watched})
            each = ", ".join(
                f"{name} {median([u.watched.get(name, 0.0) for u in uses]):.2f} (kernel "
                f"{median([u.watched_kernel.get(name, 0.0) for u in uses]):.2f})"
                for name in servers)
            parts.append(f"{label}: its own {median([u.own for u in uses]):.2f} core-s"
                         + (f", {each}" if each else "")
                         + f"; the machine {median([u.machine for u in uses]):.2f} core-s, "
                         f"{busy:.0%} of its {self.nproc} cores")
        return ("CPU while the timed command ran (medians; own = user + sys of the command "
                "and its children; a server's kernel part, sys, in brackets): "
                + " | ".join(parts))

    def check_entries(self, cache: Path, layers: Sequence[BuiltLayer]) -> None:
        """Every layer is a committed entry of the expected size (layerwarm checked the
        diff_id itself before naming it)."""
        for lay in layers:
            p = cache / f"sha256_{lay.hex}"
            if not p.exists() or p.stat().st_size != lay.uncompressed_size:
                raise AssertionError(f"layerwarm left no correct entry {p}")

    def check_peer(
        self, out: Path, layers: Sequence[BuiltLayer], full: bool, prefix: str = ""
    ) -> None:
        """The peer's output files have the right size; with ``full``, the right digest."""
        for lay in layers:
            p = out / f"{prefix}{lay.hex}"
            if p.stat().st_size != lay.uncompressed_size:
                raise AssertionError(f"peer output {p}: wrong size")
            if full and str(digest_of_file(p)[0]) != lay.diff_id:
                raise AssertionError(f"peer output {p}: digest is not the diff_id")

    def skopeo_copy(self, name: str, layout: Path, host: str | None = None) -> None:
        tag = name.split("/", 1)[1].replace(":", "-")
        argv = ["skopeo", "copy", "-q", "--src-tls-verify=false",
                f"docker://{host or self.reg.host}/{name}", f"oci:{layout}:{tag}"]
        for attempt in range(3):
            try:
                run(argv, timeout=TIMEOUT)
                return
            except CommandFailed as e:
                # skopeo 1.9 writes the layout's index.json without a lock or rename, so a
                # parallel copy can read it half written ("EOF"): what a user's script would
                # do is run that copy again, and its time counts for the peer.
                if attempt == 2 or "EOF" not in str(e):
                    raise
                self.skopeo_retries += 1

    def unpack(self, layout: Path, layers: Sequence[BuiltLayer], out: Path, parallel: int) -> None:
        """``pigz -dc`` / ``zstd -dc`` of each layer blob in an OCI layout to a file."""

        def one(lay: BuiltLayer) -> None:
            tool = ["pigz", "-dc"] if lay.compression == "gzip" else ["zstd", "-dcq"]
            run([*tool, str(layout / "blobs" / "sha256" / lay.hex)], stdout_path=out / lay.hex,
                timeout=TIMEOUT)  # fmt: skip

        with ThreadPoolExecutor(parallel) as pool:
            list(pool.map(one, layers))

    def paired(
        self,
        lw: Callable[[int], float],
        peer: Callable[[int], float],
        pairs: int = 1,
    ) -> tuple[list[float], list[float], list[float]]:
        """Run both sides ``runs`` times, alternating which goes first; return the samples
        (see `paired_runs`)."""
        return paired_runs(self.runs, lw, peer, pairs)

    def ratio_row(
        self,
        row: Row,
        samples: tuple[list[float], list[float], list[float]],
        op: str,
        limit: float,
    ) -> Row:
        lws, peers, ratios = samples
        row.lw, row.peer = _fmt_s(median(lws)), _fmt_s(median(peers))
        row.ratio = spread(ratios)
        row.target = f"{'≤' if op == '<=' else '≥'} {limit:.2f}"
        row.met = judged(ratios, op, limit)
        row.data.update(layerwarm=lws, peer=peers, ratios=ratios, peer_limit=limit)
        if len(ratios) > 1:
            row.notes.append(
                "per-run ratios " + ", ".join(f"{x:.2f}" for x in ratios)
            )
        return row

    def floor(
        self,
        names: Sequence[str],
        *,
        cold: bool,
        parallel: int = 1,
        transfer: bool = True,
        write: bool = True,
        start: bool = True,
    ) -> floors.Floor:
        """The floor (``bench.floor``) of the unique layers of ``names``, measured once per
        run and kept (1 and 1c, 4 and 4c share theirs)."""
        key = (tuple(names), cold, parallel, transfer, write, start)
        if key not in self._floors:
            layers = self.w.unique_layers(list(names))
            repo = {}
            for n in names:
                for lay in self.w.images[n].layers:
                    repo.setdefault(lay.digest, n.rsplit(":", 1)[0])
            urls = [f"{self.reg.url}/v2/{repo[x.digest]}/blobs/{x.digest}" for x in layers]
            _log(f"  measuring the floor of {len(layers)} layers ...")
            self._floors[key] = floors.measure(
                layers, urls, self.scratch / "floor", parallel=parallel,
                cold=cold and self.cold, transfer=transfer, write=write, start=start,
                repeats=3, io_parallel=IO_THREADS if parallel > 1 else 1)
        return self._floors[key]

    def floor_ratio(self, row: Row, floor: floors.Floor, limit: float | None = None) -> Row:
        """Fill the row's "÷ floor" cell (per-run layerwarm / floor); with ``limit``, a
        target on it that must hold besides the peer's."""
        values = [x / floor.seconds for x in row.data["layerwarm"]]
        row.floor = spread(values)
        row.data.update(floor=floor.seconds, floor_parts=floor.parts, floor_ratios=values)
        row.notes.append(floor.note())
        if limit is not None:
            row.target += f" and ≤ {limit:.2f} × floor"
            row.met = bool(row.met) and judged(values, "<=", limit)
        # The time the targets allow, against the shared bound: a target under it asks
        # for more than this machine's cores can do, however the work is arranged.
        allowed = {f"{limit:.2f} × floor": limit * floor.seconds} if limit is not None else {}
        if "peer_limit" in row.data:
            allowed[f"{row.data['peer_limit']:.2f} × peer"] = (
                row.data["peer_limit"] * median(row.data["peer"]))
        if allowed:
            row.data.update(shared=floor.shared, allowed=allowed,
                            client_shared=floor.client_shared)
            client = (f" ({floor.client_shared:.2f} s with requests' start-up)"
                      if floor.client_shared else "")
            row.notes.append(
                "time the targets allow here: "
                + ", ".join(f"{k} = {v:.2f} s" for k, v in allowed.items())
                + f"; shared bound {floor.shared:.2f} s{client}; layerwarm (median) "
                f"{median(row.data['layerwarm']):.2f} s")
        return row

    def delete_prefix(self, prefix: str) -> None:
        client = self.s3.client()
        for page in client.get_paginator("list_objects_v2").paginate(
            Bucket=BUCKET, Prefix=prefix + "/"
        ):
            objs = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if objs:
                client.delete_objects(Bucket=BUCKET, Delete={"Objects": objs})
