"""Through Celery: the fleet on two worker hosts against the embedded runner (8), and
many tiny layers through the workers (10)."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from bench.measure import CommandFailed, RunResult, median, run
from bench.scenarios.base import (
    BUCKET,
    IO_THREADS,
    REPO_ROOT,
    TIMEOUT,
    BenchBase,
    Row,
    judged,
    spread,
)
from bench.workload import _log
from tests.support.fleet import Fleet, cli_cmd
from tests.support.proctree import descendants

# The name the fleet's processes are counted under in a Celery run's CPU (`CpuUse.watched`):
# they are not the timed command's children, so its own CPU leaves them out.
WORKERS = "worker hosts"


def fleet_pids(fleet: Fleet) -> list[int]:
    """Every process of the fleet's worker hosts: supervisors and their Celery workers."""
    return [pid for node in fleet.nodes.values() if node.proc is not None
            for pid in (node.proc.pid, *descendants(node.proc.pid))]


class DistributedScenarios(BenchBase):
    """Scenarios 8 and 10, and the worker fleet and shared tier they start."""

    def fleet_split(self) -> tuple[int, int]:
        """Per worker host (io, cpu) concurrency: two hosts add up to one embedded run."""
        return max(1, IO_THREADS // 2), max(1, self.nproc // 2)

    def shared_tier(self, tag: str, kind: str) -> tuple[str, Callable[[], None]]:
        """A fresh remote tier URL (``s3``: a prefix on moto; ``file``: a directory) and
        the function that empties it afterwards."""
        if kind == "s3":
            return f"s3://{BUCKET}/{tag}", lambda: self.delete_prefix(tag)
        path = self.dir(f"{tag.replace('/', '-')}-shared")
        return f"file://{path}", lambda: self.rm(path)

    def through_celery(
        self, names: Sequence[str], tag: str, tier: str = "s3"
    ) -> tuple[RunResult, dict[str, Any], dict[str, float]]:
        """`submit --to remote --wait` of `names` to a fresh fleet of 2 hosts: the timed
        run, the job's status, and each host's decompression time (`decompress_seconds`)."""
        io, cpu = self.fleet_split()
        root = self.dir(f"{tag}-fleet")
        remote, clear = self.shared_tier(f"{tag}/celery", tier)
        env = self.s3.env() if tier == "s3" else {}
        fleet = Fleet(root, ("a", "b"), self.redis.url(0), remote, env,
                      io_concurrency=io, cpu_concurrency=cpu,
                      visibility_timeout=TIMEOUT, lease_ttl=120)  # fmt: skip
        fleet.start(timeout=120)
        try:
            self.cold_start()
            r = run(cli_cmd("submit", "--to", "remote", "--wait", "--json",
                            *self.refs(names)), env=fleet.env(), cwd=REPO_ROOT,
                    timeout=TIMEOUT, check=False,
                    watch={**self.servers(), WORKERS: fleet_pids(fleet)})  # fmt: skip
            if r.returncode != 0:
                raise CommandFailed(f"submit --wait exited {r.returncode}: "
                                    f"{r.stderr[-3000:]}\n{fleet.logs()}")
            status = json.loads(r.stdout)
            busy = {node.name: decompress_seconds(node.log_path.read_text(errors="replace"))
                    for node in fleet.nodes.values()}
        finally:
            fleet.stop()
            self.rm(root)
            clear()
        return r, status, busy

    def embedded(
        self, names: Sequence[str], tag: str, tier: str = "s3"
    ) -> tuple[RunResult, dict[str, Any]]:
        cache = self.dir(f"{tag}-embedded")
        remote, clear = self.shared_tier(f"{tag}/embedded", tier)
        try:
            self.cold_start()
            r, rep = self.warm(names, cache, remote=remote)
        finally:
            self.rm(cache)
            clear()
        return r, rep

    def moto_rate(self, n: int = 300) -> float:
        """HEAD + PUT of small objects per second that moto_server answers, 16 at a time."""
        import boto3
        from botocore.config import Config

        s3 = boto3.client("s3", endpoint_url=self.s3.endpoint_url, aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1",
                          config=Config(max_pool_connections=32))  # fmt: skip
        body = b"x" * 2048

        def one(i: int) -> None:
            try:
                s3.head_object(Bucket=BUCKET, Key=f"rate/{i}")
            except Exception:  # noqa: BLE001 - a 404 is the expected answer
                pass
            s3.put_object(Bucket=BUCKET, Key=f"rate/{i}", Body=body, Metadata={"a": "1"})

        started = time.perf_counter()
        with ThreadPoolExecutor(IO_THREADS) as pool:
            list(pool.map(one, range(n)))
        rate = n / (time.perf_counter() - started)
        self.delete_prefix("rate")
        return rate

    def s8(self) -> Row:
        names = self.w.fleet["gzip"]
        layers = self.w.unique_layers(names)
        io, cpu = self.fleet_split()
        row = Row(8, "the fleet through Celery (2 worker hosts), `submit --to remote --wait`")
        row.notes.append(
            f"2 `layerwarm worker` hosts (io {io}, cpu {cpu} each), private redis-server, "
            f"remote tier on moto S3; peer: the embedded runner, `warm --remote` on the same "
            f"fleet (io {IO_THREADS}, cpu {self.nproc}); {len(layers)} layers; each run "
            "starts with empty disks and an empty prefix; worker start-up is not timed"
        )

        celery_runs: list[RunResult] = []
        embedded_runs: list[RunResult] = []
        hosts_busy: list[dict[str, float]] = []

        def lw(i: int) -> float:
            r, status, busy = self.through_celery(names, f"s8-{i}")
            if status.get("state") != "done" or status["totals"]["done"] != len(layers):
                raise AssertionError(f"job not done: {json.dumps(status)[:2000]}")
            celery_runs.append(r)
            hosts_busy.append(busy)
            return r.seconds

        def peer(i: int) -> float:
            r, _ = self.embedded(names, f"s8-{i}")
            embedded_runs.append(r)
            return r.seconds

        self.ratio_row(row, self.paired(lw, peer), "<=", 1.25)
        row.notes.append(self.cpu_note([("Celery (`submit --wait`)", celery_runs),
                                        ("embedded (`warm --remote`)", embedded_runs)]))
        row.notes.append(_layerwarm_cpu_note(celery_runs, embedded_runs, self.nproc))
        row.notes.append(_moto_kernel_note(celery_runs, embedded_runs))
        row.notes.append(
            "each host's decompression per run (seconds its CPU pool spent in decompress "
            "tasks, from the hosts' Celery logs; the busier first): "
            + ", ".join("/".join(f"{x:.1f}" for x in sorted(b.values(), reverse=True))
                        for b in hosts_busy)
            + "; an IO pool takes fleet fetches as its threads free up, whatever its CPU "
            "pool has queued, so the host that takes the largest layer often takes other "
            "large ones too")
        return row
    def s10(self) -> Row:
        # Scenario 10 does not use S3; moto_server keeps working on what scenarios 7 and 8
        # left in it (it was seen at half a core here), so stop it before timing.
        self.close_s3()
        names = self.w.tiny
        layers = self.w.unique_layers(names)
        n = len(layers)
        io, cpu = self.fleet_split()
        row = Row(10, f"{n} tiny layers through Celery (2 workers)")
        rates, emb_rates = [], []
        for i in range(self.runs):
            r, status, _busy = self.through_celery(names, f"s10-{i}", tier="file")
            if status.get("state") != "done" or status["totals"]["done"] != n:
                raise AssertionError(f"job not done: {json.dumps(status)[:2000]}")
            seconds = r.seconds
            rates.append(n / seconds)
            e_seconds = self.embedded(names, f"s10-{i}", tier="file")[0].seconds
            emb_rates.append(n / e_seconds)
            _log(f"  run {i + 1}: celery {n / seconds:.1f} layers/s, "
                 f"embedded {n / e_seconds:.1f} layers/s")
        row.lw = spread(rates, "{:.1f}") + " layers/s"
        row.peer = f"({median(emb_rates):.1f} layers/s)"
        row.target = "≥ 100 layers/s"
        row.met = judged(rates, ">=", 100)
        row.data.update(celery_rates=rates, embedded_rates=emb_rates)
        moto = self.moto_rate()
        row.data.update(moto_rate=moto)
        row.notes.append(
            f"{len(names)} images × {n // max(len(names), 1)} layers of 0.25-4 KiB, gzip; "
            f"`submit --to remote --wait`, 2 hosts with io {io}, cpu {cpu}, the shared tier a "
            f"`file://` directory both hosts see; wall time from submit to the end of --wait; "
            f"the peer column is the embedded runner (`warm --remote file://...`) on the same "
            f"images, for comparison; per-run Celery rates "
            + ", ".join(f"{x:.1f}" for x in rates)
        )
        row.notes.append(
            f"not on moto: moto_server itself answers only {moto:.0f} HEAD+PUT pairs/s of "
            f"small objects here (16 client threads), which would cap any fleet below the "
            f"target whatever layerwarm does"
        )
        return row


# Celery's line for a task that ended well: "Task layerwarm.decompress[ID] succeeded in 0.71s: ..."
_DECOMPRESSED = re.compile(r"Task layerwarm\.decompress\[[^\]]+\] succeeded in ([0-9.]+)s:")


def decompress_seconds(log: str) -> float:
    """The seconds a worker host's decompress tasks took, from its Celery log."""
    return sum(float(m[1]) for m in _DECOMPRESSED.finditer(log))


def _layerwarm_cpu_note(celery: Sequence[RunResult], embedded: Sequence[RunResult],
                        nproc: int) -> str:
    """layerwarm's own CPU on each side: on the Celery side the `submit` command and the
    worker hosts' processes, on the other the `warm` command; and the machine's."""
    def ours(r: RunResult) -> float:
        return r.cpu.own + r.cpu.watched.get(WORKERS, 0.0)

    def kernel(r: RunResult) -> float:
        return r.cpu.watched_kernel.get(WORKERS, 0.0)

    sides = [median([ours(r) for r in celery]), median([ours(r) for r in embedded])]
    machine = [median([r.cpu.machine for r in runs]) for runs in (celery, embedded)]
    return (f"layerwarm's own CPU (medians): Celery {sides[0]:.2f} core-s (`submit` and "
            f"the 2 worker hosts, whose kernel part is {median([kernel(r) for r in celery]):.2f}),"
            f" embedded {sides[1]:.2f} core-s (`warm`): {sides[0] - sides[1]:+.2f} core-s; "
            f"the whole machine {machine[0]:.2f} against {machine[1]:.2f} core-s "
            f"({machine[0] - machine[1]:+.2f}) on its {nproc} cores")


def _moto_kernel_note(celery: Sequence[RunResult], embedded: Sequence[RunResult]) -> str:
    """How much of the two sides' difference is moto_server's kernel time: both sides send
    it the same objects, but its page faults cost the kernel more or less from run to run
    on this VM, and it holds the last, largest upload."""
    def kernel(runs: Sequence[RunResult]) -> list[float]:
        return [r.cpu.watched_kernel.get("moto_server", 0.0) for r in runs]

    def user(runs: Sequence[RunResult]) -> float:
        return median([r.cpu.watched.get("moto_server", 0.0) - k
                       for r, k in zip(runs, kernel(runs), strict=True)])

    wall = median([r.seconds for r in celery]) - median([r.seconds for r in embedded])
    moto = median(kernel(celery)) - median(kernel(embedded))
    pairs = ", ".join(f"{a:.1f}/{b:.1f}" for a, b in zip(kernel(celery), kernel(embedded),
                                                         strict=True))
    return (f"moto_server's kernel time (sys) per run, Celery/embedded: {pairs} s; its user "
            f"time {user(celery):.2f}/{user(embedded):.2f} s (medians); the kernel medians "
            f"differ by {moto:.2f} s, the sides' median times by {wall:.2f} s (the S3 "
            "server's page faults; a real S3 is not on the workers' cores)")
