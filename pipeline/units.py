"""Sizes and durations as people type them: `200G`, `1.5GiB`, `512M`; `6h`, `30m`, `1d`.

Decimal suffixes are powers of 1000 (K, M, G, T, KB, MB, ...), binary ones powers of 1024
(Ki, Mi, Gi, Ti, KiB, ...), case-insensitive; a bare number is bytes. Durations take s,
m, h, d, w (a bare number is seconds) and may be chained: `1h30m`. Anything else is a
UsageError naming what was given, so a typo never becomes a quota of zero.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pipeline.errors import UsageError

_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?|\.\d+)\s*([kmgtp]?)(i?)(b?)\s*", re.IGNORECASE)
_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5}
_DECIMAL = {"k": "kB", "m": "MB", "g": "GB", "t": "TB", "p": "PB"}  # as docker and df -H
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


@dataclass(frozen=True)
class Size:
    """A size as a person gave it: its bytes, and the unit they wrote it in, in which the
    sizes shown beside it are written too (`--max-size 10G`: `9.8 GB before, quota 10 GB`,
    not `9.1 GiB` against a quota the user never wrote)."""

    bytes: int
    unit: str  # "B", "kB", "MB", "GB", "TB", "PB" or "KiB", "MiB", "GiB", "TiB", "PiB"

    def show(self, n: float) -> str:
        if self.unit == "B":
            return f"{n:.0f} bytes"
        binary = self.unit.endswith("iB")
        power = _POWERS[self.unit[0].lower()]
        value = f"{n / (1024 if binary else 1000) ** power:.1f}".removesuffix(".0")
        return f"{value} {self.unit}"

    def __str__(self) -> str:
        return self.show(self.bytes)


def parse_size(text: str, what: str = "size") -> Size:
    """`text` (e.g. `200G`, `512MiB`, `1.5GiB`, `1000`) as a Size; UsageError otherwise."""
    m = _SIZE.fullmatch(text or "")
    # "i" alone after a number ("5i") or a "B"-less binary suffix without a unit is junk.
    if m is None or (m.group(3) and not m.group(2)):
        raise UsageError(
            f"invalid {what} {text!r}: want a number with an optional suffix "
            "(K, M, G, T or KiB, MiB, GiB, TiB), e.g. 200G or 1.5GiB"
        )
    number, unit, binary = float(m.group(1)), m.group(2).lower(), m.group(3)
    shown = "B" if not unit else unit.upper() + "iB" if binary else _DECIMAL[unit]
    return Size(int(number * (1024 if binary else 1000) ** _POWERS[unit]), shown)


def parse_duration(text: str, what: str = "duration") -> float:
    """Seconds in `text` (e.g. `6h`, `90s`, `1h30m`, `2d`, `45`); UsageError otherwise."""
    raw = (text or "").strip().lower()
    if re.fullmatch(r"\d+(?:\.\d+)?", raw):
        return float(raw)
    parts = _DURATION_PART.findall(raw)
    if not raw or "".join(n + u for n, u in parts) != raw:
        raise UsageError(
            f"invalid {what} {text!r}: want a number with s, m, h, d or w, e.g. 6h or 1h30m"
        )
    return sum(float(n) * _SECONDS[u] for n, u in parts)
