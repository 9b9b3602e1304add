"""The results table (plain text for the terminal, Markdown for RESULTS.md) and machine facts."""

from __future__ import annotations

import datetime as dt
import os
import platform
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from bench.scenarios import Row
from pipeline.table import table

HEADER = ("#", "scenario", "layerwarm", "peer", "ratio", "÷ floor", "target", "met?")


def _met(row: Row) -> str:
    return "n/a" if row.met is None else ("yes" if row.met else "NO")


def cells(row: Row) -> tuple[str, ...]:
    return (str(row.num), row.title, row.lw, row.peer, row.ratio, row.floor, row.target,
            _met(row))


def text_table(rows: Sequence[Row]) -> str:
    return "\n".join(table(HEADER, [cells(r) for r in rows], rule=True))


def markdown_table(rows: Sequence[Row]) -> str:
    out = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in cells(r)) + " |" for r in rows]
    return "\n".join(out)


def notes(rows: Sequence[Row]) -> str:
    out = []
    for r in rows:
        for n in r.notes:
            out.append(f"- **{r.num}** {n}")
    return "\n".join(out)


def _version(argv: list[str], pattern: str = r"\d+(\.\d+)+") -> str:
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except OSError:
        return "not installed"
    m = re.search(pattern, p.stdout + p.stderr)
    return m.group(0) if m else "?"


def _py_version(module: str) -> str:
    try:
        mod = __import__(module)
    except ImportError:
        return "not installed"
    return str(getattr(mod, "__version__", "?"))


def machine_facts() -> list[tuple[str, str]]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("flags")), "")  # fmt: skip
        sha_ni = " sha_ni" in flags + " "
    except OSError:
        sha_ni = False
    mem = "?"
    try:
        kib = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
        mem = f"{kib / 1024 / 1024:.1f} GiB"
    except (OSError, AttributeError):
        pass
    import zlib

    return [
        ("date", dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")),
        ("CPU", f"{cpu}, nproc {os.cpu_count()}, SHA-NI {'yes' if sha_ni else 'no'}"),
        ("memory", mem + _free_page_reporting()),
        ("kernel", platform.release()),
        ("Python", f"{sys.version.split()[0]} (zlib {zlib.ZLIB_RUNTIME_VERSION}, "
                   f"zstandard {_py_version('zstandard')}, isal {_py_version('isal')}, "
                   f"boto3 {_py_version('boto3')}, celery {_py_version('celery')})"),
        ("tools", f"skopeo {_version(['skopeo', '--version'])}, "
                  f"pigz {_version(['pigz', '--version'])}, "
                  f"zstd {_version(['zstd', '--version'])}, "
                  f"gzip {_version(['gzip', '--version'])}, "
                  f"docker-registry {_version(['docker-registry', '--version'])}, "
                  f"redis-server {_version(['redis-server', '--version'])}"),
    ]  # fmt: skip


_VIRTIO_BALLOON = "0x0005"
_BALLOON_F_REPORTING = 5  # VIRTIO_BALLOON_F_REPORTING: the guest reports freed pages


def _free_page_reporting() -> str:
    """A note when this is a VM that hands freed pages back to its host (virtio-balloon
    free page reporting): memory freed and used again then costs the host a fault, seen
    here as kernel time that varies from run to run (page faults, page-cache writes)."""
    for dev in Path("/sys/bus/virtio/devices").glob("*"):
        try:
            if (dev / "device").read_text().strip() != _VIRTIO_BALLOON:
                continue
            features = (dev / "features").read_text().strip()
        except OSError:
            continue
        if len(features) > _BALLOON_F_REPORTING and features[_BALLOON_F_REPORTING] == "1":
            return ("; a VM whose freed pages go back to its host (virtio-balloon free page "
                    "reporting): reusing them costs kernel time that varies run to run")
    return ""


def code_version() -> str:
    """The layerwarm commit, and whether pipeline/ or workers/ differ from it."""
    repo = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--",
                                "pipeline", "workers"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except OSError:
        return "?"
    return head + (" + uncommitted changes in pipeline/ or workers/" if dirty else "")


def cpu_ticks() -> tuple[int, int]:
    """The machine's CPU time so far, in clock ticks: (stolen by the hypervisor, all)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    # user nice system idle iowait irq softirq steal [guest guest_nice: counted in user]
    return (fields[7] if len(fields) > 7 else 0), sum(fields[:8])


def stolen_note(before: tuple[int, int], after: tuple[int, int]) -> str:
    """What share of the machine's CPU time went to other guests between two readings."""
    total = after[1] - before[1]
    if total <= 0:
        return "?"
    share = 100 * (after[0] - before[0]) / total
    return (f"{share:.1f} % of the machine's CPU time during the run (steal in /proc/stat): "
            "time the hypervisor gave to other guests, a slower and noisier machine "
            "for every figure here")


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def markdown(
    rows: Sequence[Row],
    facts: Sequence[tuple[str, str]],
    run_facts: Sequence[tuple[str, str]],
    command: str,
) -> str:
    met = [r for r in rows if r.met]
    missed = [r for r in rows if r.met is False]
    lines = [
        "# layerwarm benchmark results",
        "",
        f"Produced by `{command}` (see `bench/__init__.py` for what each scenario measures; "
        "issues 5, 14 and 16 for the targets). Ratio = layerwarm / peer, lower is better for "
        "times, each run measuring both sides back to back; shown as the median of the "
        "per-run values (min–max). ÷ floor = layerwarm / what this machine cannot go "
        "under in that scenario (`bench/floor.py`; its parts are in the notes). A target "
        "is met only when the median meets it and so do "
        "at least 60 % of the runs.",
        "",
        markdown_table(rows),
        "",
        f"Targets met: {', '.join(str(r.num) for r in met) or 'none'}. "
        f"Not met: {', '.join(str(r.num) for r in missed) or 'none'}.",
        "",
        "## Notes per scenario",
        "",
        notes(rows),
        "",
        "## Machine and run",
        "",
        *(f"- {k}: {v}" for k, v in [*facts, *run_facts]),
        "",
    ]
    return "\n".join(lines)
