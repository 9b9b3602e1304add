"""Scale past one machine, measured here (issue 16, item 5): Redis commands per layer per
target for a fleet job (S1), planning 10,000 references against a synthetic registry (S2),
an all-nodes job to 8 worker hosts on this machine (S3). docs/SCALE.md reads them for 500
hosts."""

from __future__ import annotations

import json
import random
import re
import resource
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

from bench.measure import CommandFailed, median, run
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
from bench.synthreg import SynthFleet, SynthRegistry
from bench.workload import _log
from tests.support.cli import layerwarm_cmd, layerwarm_env
from tests.support.fleet import Fleet, cli_cmd

# What each Redis command is for in a fleet job (workers/, kombu's Redis transport, Celery
# events); the MONITOR sample of S1 says which keys each one touched in the run itself.
PURPOSE = {
    "brpop": "kombu: a consumer blocks on its queues (1 s timeout, so idle hosts poll too)",
    "lpush": "kombu: a task message pushed onto a queue",
    "publish": "Celery events (-E: task-sent/received/started/succeeded, worker heartbeats) "
               "on the celeryev fanout, and the job's own events channel",
    "hset": "kombu: the unacked message copy; layerwarm: job layer states, lease holders",
    "hdel": "kombu: unacked copy removed at ack; lease release",
    "zadd": "kombu: unacked_index (visibility timeout); layerwarm: jobs:active",
    "zrem": "kombu: unacked_index entry removed at ack",
    "multi": "kombu / redis-py pipelines (ack, deliver, job records)",
    "exec": "kombu / redis-py pipelines (ack, deliver, job records)",
    "smembers": "kombu: the exchange's bindings, read at each publish to route it",
    "evalsha": "layerwarm leases: acquire / renew / release (Lua)",
    "eval": "layerwarm leases (Lua)",
    "hget": "layerwarm: job record / lease holder read",
    "hgetall": "layerwarm: job status read (`--wait` after each event), lease renewer",
    "get": "leases / result keys read",
    "set": "leases taken / result keys",
    "setex": "Celery result backend (stored results)",
    "expire": "TTL on job records",
    "pexpire": "lease renewal",
    "del": "lease or key removed",
    "ping": "health checks (redis-py, `layerwarm nodes`)",
    "subscribe": "`--wait` and Celery event receivers subscribing",
    "psubscribe": "pattern subscribers",
}


def commandstats(client: Any) -> Counter[str]:
    """``INFO commandstats`` as {command: calls} (subcommands like ``config|get`` kept)."""
    info = client.info("commandstats")
    return Counter({k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in info.items()})


_VARIABLE = re.compile(r"[0-9a-f]{32,64}|[0-9a-f]{8}-[0-9a-f-]{27}|\d{6,}")


class Monitor:
    """``MONITOR`` on the bench's Redis while a job runs: (command, first key) tallies, with
    ids and digests blanked out, to say which keys each command served."""

    def __init__(self, url: str) -> None:
        import redis

        self.tally: Counter[tuple[str, str]] = Counter()
        self._stop = threading.Event()
        self._client = redis.Redis.from_url(url)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            with self._client.monitor() as m:
                for event in m.listen():
                    if self._stop.is_set():
                        break
                    parts = str(event.get("command", "")).split(" ")
                    cmd = parts[0].lower()
                    key = _VARIABLE.sub("*", parts[1]) if len(parts) > 1 else ""
                    self.tally[(cmd, key[:60])] += 1
        except Exception:  # noqa: BLE001 - a tally lost is noted as empty, not fatal
            pass

    def stop(self) -> Counter[tuple[str, str]]:
        self._stop.set()
        self._client.ping()  # one more event, so listen() returns and sees the flag
        self._thread.join(10)
        return self.tally


def _submit(fleet: Fleet, refs: Sequence[str], to: str) -> tuple[float, dict[str, Any]]:
    r = run(cli_cmd("submit", "--to", to, "--wait", "--json", *refs), env=fleet.env(),
            cwd=REPO_ROOT, timeout=TIMEOUT, check=False)  # fmt: skip
    if r.returncode != 0:
        raise CommandFailed(f"submit --wait exited {r.returncode}: {r.stderr[-3000:]}\n"
                            f"{fleet.logs()[-6000:]}")
    return r.seconds, json.loads(r.stdout)


def _celery_share(tally: Counter[tuple[str, str]]) -> tuple[int, Counter[str]]:
    """From a MONITOR tally: the commands Celery and kombu send for themselves, and the
    task messages pushed (LPUSH onto a layerwarm queue) by kind of queue: "io" (a host's
    fetches and publishes), "cpu" (its decompresses), "fleet" (the plan)."""
    own = 0
    messages: Counter[str] = Counter()
    for (cmd, key), n in tally.items():
        if (key in ("unacked", "unacked_index") or key.startswith(("/1.celeryev", "celery-"))
                or (cmd in ("brpop", "lpush") and key.startswith("layerwarm."))
                or (cmd in ("multi", "exec") and not key)):
            own += n
        if cmd == "lpush" and key.startswith("layerwarm."):
            messages[key.rsplit(".", 1)[-1]] += n
    return own, messages


def _check_done(status: dict[str, Any], expected: int) -> None:
    if status.get("state") != "done" or status["totals"]["done"] != expected:
        raise AssertionError(f"job not done ({expected} expected): {json.dumps(status)[:2000]}")


class ScaleScenarios(BenchBase):
    """Scenarios S1, S2 and S3."""

    # ------------------------------------------------------------------ S1
    def s_redis_per_layer(self) -> Row:
        import redis

        from workers.tasks import INLINE_DECOMPRESS_BYTES, TINY_BATCH

        names = self.w.fleet["gzip"]
        layers = self.w.unique_layers(names)
        hosts = ("a", "b")
        io, cpu = max(1, IO_THREADS // 2), max(1, self.nproc // 2)
        row = Row("S1", "Redis commands per layer per target, Flower events on")
        client = redis.Redis.from_url(self.redis.url(0))
        values, idle_rates, seconds_l, tops, monitors = [], [], [], [], []
        for i in range(self.runs):
            root = self.dir(f"S1-{i}-fleet")
            remote = f"file://{self.dir(f'S1-{i}-shared')}"
            fleet = Fleet(root, hosts, self.redis.url(1), remote, {},
                          io_concurrency=io, cpu_concurrency=cpu,
                          visibility_timeout=TIMEOUT, lease_ttl=120)  # fmt: skip
            fleet.start(timeout=180)
            try:
                # What the idle fleet costs a second (BRPOP polls, heartbeats), for the note.
                time.sleep(3)
                a = commandstats(client)
                time.sleep(10)
                idle = commandstats(client) - a
                idle_rate = (sum(idle.values()) - idle["info"]) / 10
                before = commandstats(client)
                mon = Monitor(self.redis.url(0))
                seconds, status = _submit(fleet, self.refs(names), "all-nodes")
                after = commandstats(client)
                monitors.append(mon.stop())
            finally:
                fleet.stop()
                self.rm(root, self.scratch / f"S1-{i}-shared")
            targets = len({x["target"] for x in status.get("layers", [])})
            _check_done(status, len(layers) * targets)
            diff = after - before
            for ours in ("info", "monitor"):  # the bench's own calls stay out, ...
                diff.pop(ours, None)
            diff["ping"] -= 1  # ... and the PING that wakes the monitor up
            total = sum(diff.values())
            values.append(total / (len(layers) * targets))
            idle_rates.append(idle_rate)
            seconds_l.append(seconds)
            tops.append(diff)
            _log(f"  run {i + 1}: {total} commands in {seconds:.1f}s, "
                 f"{values[-1]:.1f} per layer per target; idle {idle_rate:.0f}/s")
        row.lw = spread(values, "{:.1f}") + " cmds"
        row.peer = f"(idle fleet {median(idle_rates):.0f} cmds/s)"
        row.target = "≤ 50"
        row.met = judged(values, "<=", 50)
        top = tops[len(tops) // 2].most_common(10)
        total = sum(tops[len(tops) // 2].values())
        per = len(layers) * len(hosts)
        row.data.update(per_layer_target=values, idle_rate=idle_rates, seconds=seconds_l,
                        commands=dict(tops[len(tops) // 2]))  # fmt: skip
        row.notes.append(
            f"`submit --to all-nodes --wait` of the 12-image gzip fleet ({len(layers)} unique "
            f"layers here) to 2 `layerwarm worker` hosts (io {io}, cpu {cpu}; Celery workers "
            f"run with -E, events on), shared tier `file://`, the bench's own redis-server; "
            f"`INFO commandstats` just before submit and just after --wait returned; "
            f"commands / ({len(layers)} layers × 2 targets = {per}); INFO, MONITOR and the "
            f"monitor's one PING left out; job {median(seconds_l):.1f} s; the idle fleet "
            f"alone makes {median(idle_rates):.0f} commands/s (in the count for the job's duration)"
        )
        setup = [sum(t[c] for c in ("hello", "select", "ping")) / per for t in tops]
        rest = [v - c for v, c in zip(values, setup, strict=True)]
        row.notes.append(
            f"of which connection set-up (HELLO, SELECT, PING: once per connection, and a new "
            f"fleet's first job makes each worker's pools): {spread(setup, '{:.1f}')} per "
            f"layer per target; without it {spread(rest, '{:.1f}')}"
        )
        row.notes.append(
            f"top commands ({total} in all; count, per layer per target, what for): "
            + "; ".join(f"{cmd.upper()} {n} ({n / per:.1f}) {PURPOSE.get(cmd.split('|')[0], '?')}"
                        for cmd, n in top)
        )
        if monitors and monitors[-1]:
            keys = monitors[-1].most_common(12)
            row.notes.append(
                "MONITOR, (command, key) most often: "
                + "; ".join(f"{c.upper()} {k or '-'} ×{n}" for (c, k), n in keys)
            )
            celery, by_queue = _celery_share(monitors[-1])
            messages = sum(by_queue.values())
            big = sum(1 for x in layers if x.size > INLINE_DECOMPRESS_BYTES)
            tiny = len(layers) - big
            # Per layer over 256 KiB: fetch, decompress and publish on the host that
            # fetches it, a fetch on each other; tiny layers: a batch of 20 per host.
            least_io = (2 + len(hosts) - 1) * big + len(hosts) * -(-tiny // TINY_BATCH)
            row.notes.append(
                f"Celery's and kombu's own share (MONITOR of the last run: deliver/ack "
                f"pipelines, the unacked copy, BRPOP/LPUSH, task events, result backend): "
                f"{celery / per:.1f} per layer per target, {celery / max(messages, 1):.1f} "
                f"per task message; {messages} task messages, {messages / per:.2f} per layer "
                f"per target: {by_queue['io']} to hosts' IO queues (fetches, publishes; the "
                f"fewest for these layers {least_io}: one host fetches and publishes a layer "
                f"and the other's fetch follows; tiny ones in batches), {by_queue['cpu']} to "
                f"CPU queues (decompresses; {big} layers over 256 KiB: more when one was put "
                f"back behind a blob already staged), {by_queue['fleet']} plan"
            )
        capacity = self.redis_capacity()
        row.data.update(redis_capacity=capacity)
        row.notes.append(
            "this redis-server's own rate here (`redis-benchmark -n 100000 -c 50`, no "
            "pipelining, on the same 2 cores): "
            + ", ".join(f"{k} {v / 1000:.0f}k/s" for k, v in capacity.items())
        )
        if values and not row.met:
            row.notes.append(f"over the target by {median(values) - 50:.1f} commands per "
                             f"layer per target ({median(values) / 50:.2f} × 50)")
        return row

    def redis_capacity(self) -> dict[str, float]:
        """Requests/s the bench's redis-server answers (redis-benchmark, db 0: no fleet's)."""
        r = run(["redis-benchmark", "-h", "127.0.0.1", "-p", str(self.redis.port), "--csv",
                 "-n", "100000", "-c", "50", "-t", "get,lpush,hset,zadd"],
                timeout=600, check=False)  # fmt: skip
        out: dict[str, float] = {}
        for line in r.stdout.splitlines():
            cells = [c.strip('"') for c in line.split(",")]
            if len(cells) > 1 and cells[0] != "test":
                out[cells[0]] = float(cells[1])
        return out

    # ------------------------------------------------------------------ S2
    def s_plan_10k(self) -> Row:
        fleet = SynthFleet(refs=10_000, manifests=2_000, layers=500, per_image=5,
                           per_repo=100)  # fmt: skip
        used = len(fleet.used_layers())
        synth = SynthRegistry(fleet)
        row = Row("S2", "`plan` of 10,000 references over 500 unique layers (synthetic registry)")
        secs, rss, cpus, counts_l, dups, peers = [], [], [], [], [], []
        try:
            refs_file = self.dir("S2") / "refs.txt"
            refs_file.write_text("".join(f"{synth.host}/{n}\n" for n in fleet.ref_names()))
            for i in range(self.runs):
                cache = self.dir(f"S2-{i}-cache")
                synth.reset()
                c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
                r = run(layerwarm_cmd("plan", "--json", "-f", str(refs_file)),
                        env=layerwarm_env(cache), cwd=REPO_ROOT, timeout=TIMEOUT)  # fmt: skip
                c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
                self.rm(cache)
                out = json.loads(r.stdout)
                got = (len(out["images"]), len(out["layers"]), len(out["image_failures"]))
                if got != (10_000, used, 0):
                    raise AssertionError(f"plan: (images, layers, failures) {got}")
                secs.append(r.seconds)
                rss.append(r.maxrss_kib / 1024)
                cpus.append(c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime)
                with synth.lock:
                    counts_l.append(dict(synth.counts))
                    dups.append(sum(1 for n in synth.paths.values() if n > 1))
                p = run([sys.executable, "-m", "bench.synthclient", str(refs_file)],
                        cwd=REPO_ROOT, timeout=TIMEOUT)  # fmt: skip
                if int(p.stdout) != 12_000:
                    raise AssertionError(f"synthclient fetched {p.stdout.strip()} documents")
                peers.append(p.seconds)
                _log(f"  run {i + 1}: {r.seconds:.2f}s, {rss[-1]:.0f} MiB, cpu {cpus[-1]:.1f}s, "
                     f"{counts_l[-1]}; minimal client {p.seconds:.2f}s")
        finally:
            synth.stop()
        counts = counts_l[-1]
        tag_gets, dig_gets = counts.get("GET manifest-tag", 0), counts.get("GET manifest-digest", 0)
        cfg = counts.get("GET config", 0)
        once = all(d == 0 for d in dups)
        row.lw = f"{spread(secs)} s, {spread(rss, '{:.0f}')} MiB"
        row.peer = f"({spread(peers)} s)"
        row.ratio = spread([a / b for a, b in zip(secs, peers, strict=True)])
        row.target = "≤ 10 s, ≤ 300 MiB"
        row.met = judged(secs, "<=", 10) and judged(rss, "<=", 300)
        row.data.update(seconds=secs, rss_mib=rss, cpu_seconds=cpus, requests=counts_l,
                        duplicate_paths=dups, minimal_client_seconds=peers)  # fmt: skip
        row.notes.append(
            "`layerwarm plan --json -f FILE` (resolves every ref, fetches manifests and "
            "configs, no layer) of 10,000 refs `synth/rRRR:tTT` (100 repositories × 100 "
            "tags) over 2,000 unique image manifests (each under 5 tags in 5 repositories) "
            f"over {used} unique layers (5 a manifest, each layer in 20 manifests), each "
            "manifest with its own config; fresh cache dir each run; served by bench/synthreg.py "
            "(threaded HTTP/1.1 server in the bench process; the bench's environment, so made "
            "cheap per request: documents built once at start, its own request loop instead of "
            "http.server's, ~0.1 ms of CPU a request where http.server took ~0.3; it serves "
            "the peer column the same way); wall "
            "time and peak RSS (VmHWM) of the child; met = median and ≥ 60 % of runs meet both "
            f"(judged); plan's CPU (user+sys) {spread(cpus)} s"
        )
        row.notes.append(
            f"requests: {tag_gets} manifest GETs by tag, {dig_gets} by digest, {cfg} config "
            f"GETs, {counts.get('GET ping', 0)} GET /v2/, "
            f"{sum(v for k, v in counts.items() if k.startswith('HEAD'))} HEADs, "
            f"{counts.get('GET other', 0)} other; "
            + ("no path was asked twice" if once else f"{dups[-1]} paths asked more than once")
            + f"; i.e. {tag_gets + dig_gets} manifest GETs for 2,000 unique manifests "
            f"({(tag_gets + dig_gets) / 2000:.1f} each): one per distinct tag, as a GET of a "
            f"tag is the only way to learn its digest here; configs one per unique config"
        )
        cpu_share = median(cpus) / median(secs) if secs else 0
        row.notes.append(
            f"{12_000 / median(secs):.0f} documents/s, {1000 * median(cpus) / 12_000:.1f} ms "
            f"of CPU a document; the plan process used {cpu_share:.2f} core on average (one "
            "Python process: the GIL caps it near 1 of the 2 cores; the synthetic registry "
            "runs on the same machine). The peer column, for comparison, is the least a Python "
            "client does (bench/synthclient.py: 16 threads of `requests`, GET each tag, parse "
            "it, GET each unique config once, no verification): the ratio is plan / that; "
            "not a target"
        )
        return row

    # ------------------------------------------------------------------ S3
    def _s3_images(self) -> tuple[list[str], dict[str, int]]:
        """3 images over 8 unique gzip layers of 1-4 MiB (random bytes), pushed once."""
        from tests.support.images import Image, Layer
        from tests.support.tars import File, make_tar

        rng = random.Random(16)
        blobs = []
        for n in range(8):
            size = (1 + n % 4) << 20
            blobs.append(Layer(make_tar([File(f"scale/l{n}.bin", rng.randbytes(size))])))
        sets = {"a": [0, 1, 2], "b": [0, 1, 3, 4], "c": [0, 5, 6, 7]}
        names = []
        for tag, idx in sets.items():
            name = f"bench/scale-{tag}:v1"
            self.reg.push_image(name.split(":")[0], "v1", Image([blobs[i] for i in idx]))
            names.append(name)
        return names, {b.digest: b.size for b in blobs}

    def s_all_nodes_8(self) -> Row:
        from tests.support.faults import S3Proxy
        from tests.support.proxy import Proxy

        names, unique = self._s3_images()
        n_hosts = 8
        hosts = tuple(f"h{k}" for k in range(n_hosts))
        row = Row("S3", f"`submit --to all-nodes --wait` to {n_hosts} worker hosts, one machine")
        secs, reg_ratio, s3_per, start_s, details = [], [], [], [], []
        for i in range(self.runs):
            tag = f"S3-{i}"
            prefix = f"{tag}/shared"
            reg_proxy = Proxy(self.reg.url)
            s3_proxy = S3Proxy(self.s3.endpoint_url)
            root = self.dir(f"{tag}-fleet")
            env = {**self.s3.env(), "AWS_ENDPOINT_URL_S3": s3_proxy.url}
            fleet = Fleet(root, hosts, self.redis.url(2), f"s3://{BUCKET}/{prefix}", env,
                          io_concurrency=2, cpu_concurrency=1, visibility_timeout=TIMEOUT,
                          lease_ttl=120)  # fmt: skip
            t0 = time.monotonic()
            try:
                fleet.start(timeout=600)
                start_s.append(time.monotonic() - t0)
                reg_proxy.reset()
                s3_proxy.reset()
                seconds, status = _submit(fleet, self.refs(names, reg_proxy.host), "all-nodes")
                reg_log, s3_log = reg_proxy.requests_log, s3_proxy.requests_log
            finally:
                fleet.stop()
                reg_proxy.stop()
                s3_proxy.stop()
                self.rm(root)
                self.delete_prefix(prefix)
            targets = len({x["target"] for x in status.get("layers", [])})
            _check_done(status, len(unique) * targets)
            blob_re = re.compile(r"/v2/.+/blobs/(sha256:[0-9a-f]{64})")
            served = Counter()
            fetches = Counter()
            for h in reg_log:
                m = blob_re.search(h.path)
                if h.method == "GET" and m and m[1] in unique:
                    served[m[1]] += h.bytes_sent
                    fetches[m[1]] += 1
            reg_bytes = sum(served.values())
            obj = [h for h in s3_log if h.method == "GET" and f"/{prefix}/" in h.path
                   and "list-type" not in h.path]  # fmt: skip
            s3_gets = len(obj)
            secs.append(seconds)
            reg_ratio.append(reg_bytes / sum(unique.values()))
            s3_per.append(s3_gets / len(unique))
            methods = Counter(h.method for h in s3_log)
            details.append((targets, dict(fetches), s3_gets, dict(methods), reg_bytes,
                            sum(h.bytes_sent for h in obj)))  # fmt: skip
            _log(f"  run {i + 1}: {seconds:.1f}s (start {start_s[-1]:.0f}s), registry "
                 f"{reg_ratio[-1]:.2f} × unique, S3 GETs/layer {s3_per[-1]:.1f}, {methods}")
        targets, fetches, s3_gets, methods, reg_bytes, s3_bytes = details[-1]
        row.lw = (f"{spread(secs)} s; registry {spread(reg_ratio)} × unique; "
                  f"S3 GETs/layer {spread(s3_per, '{:.1f}')}")
        row.target = "= 1.00 × unique; ≤ 8 GETs/layer"
        row.met = (judged(reg_ratio, "=", 1.0) and judged(s3_per, "<=", n_hosts))
        row.data.update(seconds=secs, registry_ratio=reg_ratio, s3_gets_per_layer=s3_per,
                        start_seconds=start_s)  # fmt: skip
        row.notes.append(
            f"{n_hosts} `layerwarm worker` hosts on this machine (io 2, cpu 1 each: "
            f"{2 * n_hosts} Celery workers), one private redis-server, shared tier on moto S3 "
            f"behind a counting S3Proxy, registry behind a counting Proxy; {len(names)} images "
            f"over {len(unique)} unique gzip layers of 1-4 MiB ({sum(unique.values()) >> 20} "
            f"MiB); job of {targets} targets; wall time from submit to the end of --wait "
            f"(worker start-up, {spread(start_s, '{:.0f}')} s, not timed); met: registry "
            "ratio = 1.00 and S3 GETs per layer ≤ 8, each judged over runs"
        )
        row.notes.append(
            f"registry blob GETs per layer: {sorted(fetches.values())} ({reg_bytes} bytes "
            f"served for {sum(unique.values())} unique); S3 object GETs {s3_gets} "
            f"({s3_bytes >> 20} MiB) for {len(unique)} layers × {targets} targets; S3 requests "
            f"by method {methods}"
        )
        return row
