"""Live progress for `warm`: bars on a terminal; elsewhere the log lines say it all.

`TerminalProgress` redraws a bar per layer in flight and a total line (bytes, rate, ETA)
a few times a second from its own thread, and erases them when closed so the summary
prints on a clean screen.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TextIO

from pipeline.stages import LayerSpec

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def human_bytes(n: float) -> str:
    for unit in _UNITS:
        if abs(n) < 1024 or unit == _UNITS[-1]:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def human_seconds(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


@dataclass
class _LayerState:
    stage: str = "pending"
    done: int = 0
    total: int | None = None


class TerminalProgress:
    WIDTH = 24
    MAX_ROWS = 8

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.total_layers = self.total_bytes = 0
        self._lock = threading.Lock()
        self._layers: dict[LayerSpec, _LayerState] = {}
        self._transferred = 0   # bytes moved over the network (fetch, restore)
        self._finished = 0
        self._started = time.monotonic()
        self._drawn = 0
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
        self._erase()
        self.stream.flush()

    def _loop(self) -> None:
        while not self._stop.wait(0.2):
            self._draw()

    def _erase(self) -> None:
        if self._drawn:
            self.stream.write(f"\x1b[{self._drawn}F\x1b[J")
            self._drawn = 0

    def _draw(self) -> None:
        with self._lock:
            rows = [self._bar(layer, s) for layer, s in list(self._layers.items())[: self.MAX_ROWS]]
            rows.append(self._total_line())
        self._erase()
        self.stream.write("".join(row + "\n" for row in rows))
        self.stream.flush()
        self._drawn = len(rows)

    def _bar(self, layer: LayerSpec, s: _LayerState) -> str:
        if s.total:
            frac = min(s.done / s.total, 1.0)
            filled = int(frac * self.WIDTH)
            bar = "#" * filled + "-" * (self.WIDTH - filled)
            amount = f"{human_bytes(s.done)} / {human_bytes(s.total)}"
        else:
            bar, amount = "." * self.WIDTH, human_bytes(s.done)
        return f"{layer.digest.short}  {s.stage:<13} [{bar}] {amount}"

    def _total_line(self) -> str:
        elapsed = max(time.monotonic() - self._started, 1e-6)
        rate = self._transferred / elapsed
        left = max(self.total_bytes - self._transferred, 0)
        eta = human_seconds(left / rate) if rate > 0 and left else "-"
        return (
            f"total  {self._finished}/{self.total_layers} layers  "
            f"{human_bytes(self._transferred)} / {human_bytes(self.total_bytes)}  "
            f"{human_bytes(rate)}/s  ETA {eta}"
        )
