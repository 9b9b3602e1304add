"""The clean-install smoke's registry: a real docker-registry with one small image in it.

Run by .ci/smoke with the SYSTEM python (the one with the test extras), never the smoke's
venv, which must hold only what `pip install .` brings. Starts the registry the way the
tests do (tests/support/registry.py: config file, free 127.0.0.1 port), pushes
smoke/hello:1 (one gzip layer), writes "<host:port> <cache entry name> <sha256 of the
decompressed tar>" to INFO_FILE (the entry is named by the blob digest, holds the tar), then
serves until SIGTERM/SIGINT or until its parent (the smoke script) is gone.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.support

from tests.support.fleetcheck import cache_name  # noqa: E402
from tests.support.images import File, Image, Layer, make_tar  # noqa: E402
from tests.support.registry import RegistryServer  # noqa: E402


def main(info_file: str) -> int:
    stop_signals = {signal.SIGTERM, signal.SIGINT}
    # Blocked before the registry starts, so a stop signal is always seen by the wait
    # below and the registry is stopped with us, never left running.
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    parent = os.getppid()
    with RegistryServer() as registry:
        layer = Layer(make_tar([File("hello.txt", b"hello from the layerwarm smoke\n")]))
        registry.push_image("smoke/hello", "1", Image([layer]))
        tmp = Path(info_file + ".tmp")
        diff_hex = layer.diff_id.removeprefix("sha256:")
        tmp.write_text(f"{registry.host} {cache_name(layer)} {diff_hex}\n")
        tmp.rename(info_file)  # whole or absent: the script reads it once it exists
        while os.getppid() == parent:
            if signal.sigtimedwait(stop_signals, 1.0) is not None:
                break
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
