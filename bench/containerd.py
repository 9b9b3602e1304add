"""A containerd of the bench's own (issue 16, item 3): Debian's ``containerd`` and ``ctr``
(`apt-get install containerd`), started on a root, state and socket in a temp dir with a
minimal config (version 2, the CRI plugin disabled), never the system's.

``fresh()`` stops it and starts it again on an empty root, so every timed pull begins with
no content and no snapshots; the restart is never inside a timed pull.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

from bench.measure import RunResult, run

NAMESPACE = "bench"


def missing() -> str | None:
    """Why containerd cannot run here, or None."""
    absent = [b for b in ("containerd", "ctr") if shutil.which(b) is None]
    if absent:
        return (f"{' and '.join(absent)} not installed (`apt-get install containerd`): no "
                "containerd figure")
    return None


class Containerd:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.proc: subprocess.Popen[bytes] | None = None
        self.root: Path | None = None
        self.generation = 0

    @property
    def sock(self) -> str:
        assert self.root is not None
        return str(self.root / "containerd.sock")

    def start(self) -> None:
        self.generation += 1
        root = self.base / f"run-{self.generation}"
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        self.root = root
        (root / "config.toml").write_text(
            "version = 2\n"
            f'root = "{root}/root"\n'
            f'state = "{root}/state"\n'
            'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
            "[grpc]\n"
            f'  address = "{root}/containerd.sock"\n'
            "[ttrpc]\n"
            f'  address = "{root}/containerd-ttrpc.sock"\n'
        )
        log = open(root / "containerd.log", "wb")
        self.proc = subprocess.Popen(
            ["containerd", "--config", str(root / "config.toml")],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        log.close()
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"containerd exited {self.proc.returncode}: "
                                   f"{(root / 'containerd.log').read_text()[-2000:]}")
            if Path(self.sock).exists() and self.ctr("version", check=False).returncode == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError("containerd did not answer on its socket within 60 s")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    def fresh(self) -> None:
        """containerd on an empty root: no content, no snapshots, no images."""
        self.stop()
        self.start()

    def ctr(self, *args: str, check: bool = True) -> RunResult:
        return run(["ctr", "-a", self.sock, "-n", NAMESPACE, *args], timeout=3600, check=check)

    def pull(self, ref: str, snapshotter: str) -> RunResult:
        """`ctr images pull`: fetch, verify and unpack into ``snapshotter`` snapshots."""
        return self.ctr("images", "pull", "--plain-http", "--snapshotter", snapshotter, ref)

    def check_unpacked(self, refs: list[str], snapshotter: str, layers: int) -> str:
        """Raise unless every image is complete and at least ``layers`` snapshots exist."""
        out = self.ctr("images", "check").stdout
        for ref in refs:
            line = next((x for x in out.splitlines() if x.startswith(ref + " ")), "")
            if "complete" not in line:
                raise AssertionError(f"ctr images check: {ref} is not complete:\n{out}")
        snaps = self.ctr("snapshots", "--snapshotter", snapshotter, "ls").stdout
        count = len(snaps.strip().splitlines()) - 1  # a header line
        if count < layers:
            raise AssertionError(f"{count} {snapshotter} snapshots for {layers} layers:\n{snaps}")
        return f"checked once: `ctr images check` complete, {count} {snapshotter} snapshots"


def version() -> str:
    try:
        out = subprocess.run(["containerd", "--version"], capture_output=True, text=True,
                             timeout=10).stdout.split()
    except OSError:
        return "?"
    return out[2] if len(out) > 2 else "?"
