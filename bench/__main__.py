"""``python3 -m bench``: build the workload, run the scenarios, print (and write) the table."""

from __future__ import annotations

import argparse
import compileall
import shlex
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from bench import report
from bench import venv as bench_venv
from bench.scenarios import ORDER, REPO_ROOT, Bench, run_all
from bench.services import push_workload, start_registry
from bench.workload import build, cache_root, default_cache_dir


def parse_only(text: str) -> list[str]:
    ids = [x.strip() for x in text.split(",") if x.strip()]
    if not ids:
        raise argparse.ArgumentTypeError(f"--only wants scenario ids like 1,3,6, not {text!r}")
    bad = [x for x in ids if x not in ORDER]
    if bad:
        raise argparse.ArgumentTypeError(
            f"no scenario {bad[0]} (there are {', '.join(ORDER)})")
    return ids


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="small workload (< 3 minutes)")
    p.add_argument("--runs", type=int, default=3, help="runs per scenario (3); median")
    p.add_argument("--seed", type=int, default=1, help="workload seed (1)")
    p.add_argument("--only", type=parse_only, default=list(ORDER), metavar="N,N",
                   help="scenarios to run, e.g. 1,3,6 (all)")
    p.add_argument("--out", type=Path, metavar="FILE", help="write the results as Markdown")
    p.add_argument("--cache-dir", type=Path, metavar="DIR",
                   help="where built blobs and the registry storage are kept "
                        "(~/.cache/layerwarm-bench/<seed>-<scale>-v<N>)")
    p.add_argument("--keep-scratch", action="store_true", help="keep the scratch directory")
    args = p.parse_args(argv)
    if args.runs < 1:
        p.error("--runs must be at least 1")

    # Run as a user's install runs (bench/venv.py): in a venv of the bench's own.
    venv = bench_venv.venv_dir(cache_root())
    if not bench_venv.running_in(venv):
        bench_venv.rerun_in(venv, list(argv) if argv is not None else sys.argv[1:])
    # `kill` (SIGTERM) unwinds like Ctrl-C, so the finally blocks below stop the registry,
    # S3 server, Redis and worker fleet this run started instead of leaving them behind.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    # An installed layerwarm has its bytecode compiled at install time (pip does that); a
    # checkout run with PYTHONDONTWRITEBYTECODE=1 (as on the team's machines) would compile
    # every module from source on every start instead, which no user's install does.
    for package in ("pipeline", "workers"):
        compileall.compile_dir(REPO_ROOT / package, quiet=1)
    scale = "quick" if args.quick else "full"
    cache_dir = args.cache_dir or default_cache_dir(scale, args.seed)
    started = time.monotonic()
    facts = report.machine_facts()
    code_before = report.code_version()
    load_before = report.load_average()
    ticks_before = report.cpu_ticks()
    t0 = time.monotonic()
    workload = build(scale, args.seed, cache_dir, jobs=2)
    build_s = time.monotonic() - t0
    registry = start_registry(cache_dir / "registry")
    scratch = Path(tempfile.mkdtemp(prefix="layerwarm-bench-"))
    bench = None
    try:
        t0 = time.monotonic()
        push_workload(registry, workload)
        push_s = time.monotonic() - t0
        bench = Bench(workload, registry, args.runs, scratch)
        rows = run_all(bench, args.only)
    finally:
        if bench is not None:
            bench.close()
        registry.cleanup()  # its workdir: config and log; storage stays in the cache
        if not args.keep_scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    total_s = time.monotonic() - started

    print()
    print(report.text_table(rows))
    print()
    print(report.notes(rows))
    cold = "dropped before each side of scenarios 1, 2, 4, 7, 8 and 10 (`echo 3 > " \
        "/proc/sys/vm/drop_caches`)" if bench.cold else \
        "NOT dropped: /proc/sys/vm/drop_caches refused here, so every figure is warm-cache"
    code_after = report.code_version()
    code = code_before if code_before == code_after else \
        f"{code_before} at start, {code_after} at end (the code changed during the run)"
    run_facts = [
        ("layerwarm commit", code),
        ("workload", f"{scale} scale, seed {args.seed}: {len(workload.images)} images, "
                     f"{len({x.digest for x in workload.layers.values()})} blobs "
                     f"(built/loaded in {build_s:.0f} s, pushed in {push_s:.0f} s; "
                     f"cache {cache_dir})"),
        ("runs", f"{args.runs} per scenario; whole run {total_s / 60:.1f} min"),
        ("page cache", cold),
        ("interpreter", f"{sys.executable}: a venv of the bench's own (bench/venv.py) with "
                        "layerwarm installed from this checkout, as README's `pip install .` "
                        "into a venv runs it; the base interpreter's .pth files do not run"),
        ("bytecode", "pipeline/ and workers/ compiled (compileall) before the run, as a "
                     "pip-installed layerwarm is; the machine sets PYTHONDONTWRITEBYTECODE=1"),
        ("load average", f"{load_before} at start, {report.load_average()} at end "
                         "(1, 5 and 15 minute averages; they include this run's own processes)"),
        ("CPU stolen", report.stolen_note(ticks_before, report.cpu_ticks())),
    ]  # fmt: skip
    if args.out:
        command = "python3 -m bench " + shlex.join(argv if argv is not None else sys.argv[1:])
        args.out.write_text(report.markdown(rows, facts, run_facts, command))
        print(f"\nwrote {args.out}", file=sys.stderr)
    return 0 if all(r.met is not None for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
