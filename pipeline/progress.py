"""Live progress on a terminal: a bar per layer in flight and a total line.

`LiveArea` redraws a block of lines at the bottom of the terminal; `TerminalProgress`
feeds it from the stages of an embedded `warm` (redrawn from its own thread a few times a
second). The job follower of distributed mode draws the same lines from job records.
Where stderr is not a terminal, the log lines say it all.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:  # for annotations only: importing stages would pull in requests
    from pipeline.layer import LayerSpec

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")
BAR_WIDTH = 24
MAX_ROWS = 8


def human_bytes(n: float) -> str:
    for unit in _UNITS:
        if abs(n) < 1024 or unit == _UNITS[-1]:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def human_seconds(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def bar_line(label: str, stage: str, done: int, total: int | None) -> str:
    if total:
        filled = int(min(done / total, 1.0) * BAR_WIDTH)
        bar = "#" * filled + "-" * (BAR_WIDTH - filled)
        amount = f"{human_bytes(done)} / {human_bytes(total)}"
    else:
        bar, amount = "." * BAR_WIDTH, human_bytes(done)
    return f"{label}  {stage:<13} [{bar}] {amount}"


def total_line(finished: int, layers: int, done: int, total: int, elapsed: float) -> str:
    rate = done / max(elapsed, 1e-6)
    left = max(total - done, 0)
    eta = human_seconds(left / rate) if rate > 0 and left else "-"
    return (
        f"total  {finished}/{layers} layers  {human_bytes(done)} / {human_bytes(total)}  "
        f"{human_bytes(rate)}/s  ETA {eta}"
    )


class LiveArea:
    """A block of lines redrawn in place with ANSI cursor movement."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self._drawn = 0

    def draw(self, lines: Sequence[str]) -> None:
        self.clear()
        self.stream.write("".join(line + "\n" for line in lines))
        self.stream.flush()
        self._drawn = len(lines)

    def clear(self) -> None:
        if self._drawn:
            self.stream.write(f"\x1b[{self._drawn}F\x1b[J")
            self.stream.flush()
            self._drawn = 0


@dataclass
class _LayerState:
    stage: str = "pending"
    done: int = 0
    total: int | None = None


class TerminalProgress:
    def __init__(self, stream: TextIO) -> None:
        self.area = LiveArea(stream)
        self.total_layers = self.total_bytes = 0
        self._lock = threading.Lock()
        self._layers: dict[LayerSpec, _LayerState] = {}
        self._transferred = 0   # bytes moved over the network (fetch, restore)
        self._finished = 0
        self._started = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="layerwarm-progress", daemon=True)

    def planned(self, layers: Sequence[LayerSpec]) -> None:
        self.total_layers, self.total_bytes = len(layers), sum(x.size for x in layers)
        self._started = time.monotonic()
        self._thread.start()

    def stage(self, layer: LayerSpec, stage: str, total: int | None) -> None:
        with self._lock:
            state = self._layers.setdefault(layer, _LayerState())
            state.stage, state.done, state.total = stage, 0, total
            if stage in ("done", "failed"):
                self._finished += 1
                del self._layers[layer]

    def advance(self, layer: LayerSpec, nbytes: int) -> None:
        with self._lock:
            state = self._layers.setdefault(layer, _LayerState())
            state.done += nbytes
            if state.stage in ("fetching", "restoring"):
                self._transferred += nbytes

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self.area.clear()

    def _loop(self) -> None:
        while not self._stop.wait(0.2):
            with self._lock:
                rows = [
                    bar_line(layer.digest.short, s.stage, s.done, s.total)
                    for layer, s in list(self._layers.items())[:MAX_ROWS]
                ]
                rows.append(total_line(
                    self._finished, self.total_layers, self._transferred, self.total_bytes,
                    time.monotonic() - self._started,
                ))
            self.area.draw(rows)
