"""The scenarios of issues 5 (1-10) and 14 (11-15), each measuring layerwarm and its peer
side by side.

One module per family, each a mixin over ``base.BenchBase`` (the shared setup and the
measuring helpers):
    big_image.py    1, 2, 3, 9   the big image: cold warm, the decompress stage, peak RSS
    fleet.py        4, 5, 6      the image fleet: cold warm, bytes fetched, warm again
    remote.py       7            restore the fleet from the S3 tier
    distributed.py  8, 10        through Celery on two worker hosts
    containerd.py   1c, 4c       the big image and the fleet against containerd's pull
    reading.py      11-15        reading images: index cost, cat / files / mount / chroot
    scale.py        S1-S3        past one machine: Redis per layer, plan 10,000 refs, 8 hosts
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Sequence

from bench.scenarios.base import REPO_ROOT, Row
from bench.scenarios.big_image import BigImageScenarios
from bench.scenarios.containerd import ContainerdScenarios
from bench.scenarios.distributed import DistributedScenarios
from bench.scenarios.fleet import FleetScenarios
from bench.scenarios.reading import ReadingScenarios
from bench.scenarios.remote import RemoteScenarios
from bench.scenarios.scale import ScaleScenarios
from bench.workload import _log

__all__ = ["ORDER", "REPO_ROOT", "SCENARIOS", "TITLES", "Bench", "Row", "run_all"]


class Bench(BigImageScenarios, FleetScenarios, RemoteScenarios, DistributedScenarios,
            ReadingScenarios, ContainerdScenarios, ScaleScenarios):
    """Every scenario, on one shared state (what one scenario leaves, another may reuse)."""


# Scenario ids: issue 5's 1-10, issue 14's 11-15; a peer of another kind gets a letter
# (1c: scenario 1 against containerd), a scale scenario an S. Each maps to its method.
SCENARIOS: dict[str, str] = {
    "1": "s1", "2": "s2", "3": "s3_decompress", "4": "s4", "5": "s5", "6": "s6", "7": "s7",
    "8": "s8", "9": "s9", "10": "s10", "11": "s11_index_cost", "12": "s12_cat",
    "13": "s13_files", "14": "s14_mount_read", "15": "s15_chroot",
    "1c": "s1c", "4c": "s4c",
    "S1": "s_redis_per_layer", "S2": "s_plan_10k", "S3": "s_all_nodes_8",
}  # fmt: skip
TITLES = {
    "1": "cold `warm` of the big gzip image", "2": "cold `warm` of the big zstd image",
    "3": "decompress + verify diff_id of the big gzip layer",
    "4": "cold `warm` of the gzip fleet", "5": "bytes fetched / bytes of unique layers",
    "6": "warm again, everything on disk", "7": "restore the fleet from the S3 tier",
    "8": "the fleet through Celery", "9": "peak RSS of `warm` on the big image",
    "10": "tiny layers through Celery",
    "11": "index cost: decompress stage with / without the file index",
    "12": "`cat` of a ≤ 64 KiB file, layers only in S3",
    "13": "`files -R` of the base image, index on disk",
    "14": "sequential read of a 100 MiB file through the mount",
    "15": "chroot start from a mount, layers only in S3",
    "1c": "cold `warm` of the big gzip image vs containerd pull + unpack",
    "4c": "cold `warm` of the gzip fleet vs containerd, one image after another",
    "S1": "Redis commands per layer per target, events on",
    "S2": "plan 10,000 refs / 500 unique layers", "S3": "all-nodes job to 8 worker hosts",
}  # fmt: skip
# 9 reuses the RSS of 1 and 2; 6 the cache of 4; 1c and 4c come after 6
ORDER = ("1", "2", "9", "3", "4", "6", "1c", "4c", "5", "7", "8", "10", "11", "12", "13",
         "14", "15", "S1", "S2", "S3")


def run_all(bench: Bench, only: Sequence[str]) -> list[Row]:
    rows = []
    for num in ORDER:
        if num not in only:
            continue
        _log(f"scenario {num} ...")
        started = time.monotonic()
        try:
            row = getattr(bench, SCENARIOS[num])()
        except Exception as e:  # report it and carry on with the others
            traceback.print_exc()
            row = Row(num, TITLES[num] + " (FAILED)",
                      notes=[f"FAILED: {type(e).__name__}: {str(e)[:1500]}"])
        _log(f"scenario {num} took {time.monotonic() - started:.0f}s: {row.lw} vs {row.peer}, "
             f"ratio {row.ratio}, met {row.met}")
        rows.append(row)
    bench.rm(bench.fleet_cache)
    shown = sorted(ORDER, key=_numeric)  # the table's order: 1, 1c, 2, ..., S1
    return sorted(rows, key=lambda r: shown.index(str(r.num)) if str(r.num) in shown else 99)


def _numeric(sid: str) -> tuple[int, str]:
    digits = "".join(c for c in sid if c.isdigit())
    return (int(digits) + (1000 if sid.startswith("S") else 0), sid) if digits else (9999, sid)
