"""The remote tier: the disk wiped, the fleet restored from S3 (7)."""

from __future__ import annotations

import sys

from bench.measure import run
from bench.scenarios.base import BUCKET, IO_THREADS, REPO_ROOT, TIMEOUT, BenchBase, Row
from bench.workload import MiB
from tests.support.cli import layerwarm_env


class RemoteScenarios(BenchBase):
    """Scenario 7."""

    def s7(self) -> Row:
        names = self.w.fleet["gzip"]
        layers = self.w.unique_layers(names)
        row = Row(7, "disk wiped, restore the fleet from the S3 tier")
        prefix = "s7"
        remote = f"s3://{BUCKET}/{prefix}"
        seed = self.dir("s7-seed")
        self.warm(names, seed, remote=remote)
        self.rm(seed)
        client = self.s3.client()
        keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(
            Bucket=BUCKET, Prefix=prefix + "/") for o in page.get("Contents", [])]
        # The layers, not their file indexes (`<key>.index`, beside each since issue 14).
        keys = [k for k in keys if k.rsplit("/", 1)[-1].startswith("sha256_")
                and not k.endswith(".index")]
        expected = {f"{prefix}/sha256_{x.hex}" for x in layers}
        if set(keys) != expected:
            raise AssertionError(f"remote tier holds {len(keys)} entries, {len(expected)} expected")
        row.notes.append(
            f"S3 is moto_server on loopback; {len(keys)} objects, "
            f"{sum(x.uncompressed_size for x in layers) / MiB:.0f} MiB; layerwarm restores with "
            f"--io-threads {IO_THREADS} (and verifies each diff_id); peer: boto3 "
            f"`download_file` of the same objects, {IO_THREADS} at a time, default "
            "TransferConfig, no verification"
        )

        def lw(i: int) -> float:
            cache = self.dir("s7-lw")
            self.cold_start()
            r, rep = self.warm(names, cache, remote=remote)
            if rep["totals"]["from_remote"] != len(layers):
                raise AssertionError(f"expected every layer from remote: {rep['totals']}")
            self.check_entries(cache, layers)
            self.rm(cache)
            return r.seconds

        def peer(i: int) -> float:
            out = self.dir("s7-peer")
            env = {**layerwarm_env(self.scratch / "s7-env"), **self.s3.env()}
            self.cold_start()
            r = run([sys.executable, "-m", "bench.children", "s3get", "--bucket", BUCKET,
                     "--out", str(out), "--concurrency", str(IO_THREADS), *keys],
                    env=env, cwd=REPO_ROOT, timeout=TIMEOUT)  # fmt: skip
            self.check_peer(out, layers, full=(i == 0), prefix="sha256_")
            self.rm(out)
            return r.seconds

        self.ratio_row(row, self.paired(lw, peer), "<=", 1.15)
        self.delete_prefix(prefix)
        return row
