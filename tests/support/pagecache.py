"""What of a file the page cache holds, for tests of which entries stay out of it."""

from __future__ import annotations

import subprocess
from pathlib import Path


def resident(path: Path) -> int:
    """Bytes of the file in the page cache, as util-linux's fincore counts them."""
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                         capture_output=True, text=True, check=True)
    return int(out.stdout.strip())
