"""layerwarm's benchmark harness (issues 5, 14): layerwarm against the tools users would pick.

    python3 -m bench                      # full workload, 3 runs, print the table
    python3 -m bench --quick --runs 1     # small workload, < 3 minutes
    python3 -m bench --only 1,3,6 --out bench/RESULTS.md

It runs under a venv of its own, with layerwarm installed from the checkout as a user's
`pip install .` into a venv is (``bench.venv``: built once, then the bench re-runs itself
there), so layerwarm and every Python child start without the .pth hooks of the machine's
base interpreter. It builds a deterministic workload (``bench.workload``) into a local
``docker-registry`` (the tests' ``RegistryServer``), then for each scenario measures
layerwarm and its peer in the same run, side by side, and prints: scenario, layerwarm
time, peer time, ratio (layerwarm / peer), ÷ floor (layerwarm / what this machine cannot
go under, ``bench.floor``: the largest of decompression, sha256, loopback transfer and
write, + interpreter start-up), target (Nxfl: N × floor), met? A row with a floor also
notes its shared bound (the parts that keep a core busy, spread over all the cores), the
same with the start-up of a process that imports requests (the registry client's HTTP
library) in place of the bare interpreter's, and the seconds its targets allow.
Rows 1, 2, 4 and 8 note where the cores went while the timed command ran
(``bench.measure.CpuUse``: its own CPU, the registry's and moto_server's, the machine's
share of busy): whether a ratio is held by a machine with no core left to give.

    1  cold `warm` of the big gzip image      skopeo copy + pigz -dc          <= 0.50, 1.3xfl
    1c same                                    containerd `ctr images pull`    <= 0.20
    2  same, zstd image                        skopeo copy + zstd -dc          <= 0.85, 1.15xfl
    3  decompress + verify the big gzip layer  gzip -dc > /dev/null            <= 0.45
    4  cold `warm` of the gzip fleet           skopeo x4 into one layout + pigz <= 0.55
    4c same                                    `ctr images pull`, one by one   <= 0.20
    5  registry bytes / unique layer bytes     (skopeo, for comparison)        = 1.00
    6  warm again, all on disk                 skopeo inspect of each image    <= 0.80
    7  restore the fleet from S3               boto3 download_file, same conc. <= 1.15
    8  the fleet through Celery (2 hosts)      the embedded runner             <= 1.25
    9  peak RSS of `warm` on the big image     -                               <= 150 MiB
    10 tiny layers through Celery (2 hosts)    (the embedded runner)           >= 100 layers/s
    11 decompress stage with the file index    the same stage without it       <= 1.05
    12 `cat` of a small file, layers in S3 only restoring that layer           <= 0.05, bytes
    13 `files -R` of a base image              -                               <= 0.30 s
    14 sequential read through `mount`         the same file in an unpacked tree >= 0.50
    15 chroot start from a mount, S3 only      restore + `export --dir`        <= 0.25, bytes

Each ratio is shown as the median of the per-run values (min–max); a target is met when
the median and at least 60 % of the runs meet it (``scenarios.base.judged``). A run of
11 is five pairs of its two children and takes their medians: the index costs less than
one pair's noise on a small VM.

1c and 4c need containerd and ctr (`apt-get install containerd`; Debian's 1.6.20). The
bench runs its own containerd (root, state and socket in its scratch dir, CRI plugin off),
never the system's; without them those rows say so and are not met.

The harness only reports; no test asserts timing. ``bench.workload.build(scale, seed)``
is the deterministic builder tests can compare across builds.
"""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]  # the checkout the bench runs from
