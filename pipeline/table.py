"""The one table renderer: every table the commands and the bench print goes through it.

A table is a header and rows of strings. Columns are as wide as their widest cell and two
spaces apart; a column is left-aligned unless named in `right` (numbers, sizes). Lines end
without trailing blanks, so the last column never pads.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence


def table(
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    right: Collection[int] = (),
    *,
    rule: bool = False,
    indent: str = "",
) -> list[str]:
    """Lines of the table: the header, a line of dashes under it with `rule`, the rows.

    `indent` prefixes every line (a table nested under a heading, as in `inspect`).
    """
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    # One format string for every row: a listing of ten thousand files is formatted in C,
    # not cell by cell in Python. Braces in cells are data to format(), never parsed.
    line = indent + "  ".join(f"{{:{'>' if i in right else '<'}{w}}}"
                              for i, w in enumerate(widths))

    def fmt(row: Sequence[str]) -> str:
        if len(row) != len(widths):
            raise ValueError(f"a row of {len(row)} cells in a table of {len(widths)} columns")
        return line.format(*row).rstrip()

    lines = [fmt(header)]
    if rule:
        lines.append(indent + "  ".join("-" * w for w in widths))
    return lines + [fmt(r) for r in rows]


# Words whose plural is not the word plus "s"; every other counted noun just takes an "s".
_IRREGULAR = {"entry": "entries"}


def counted(n: int, word: str) -> str:
    """`1 layer`, `3 layers`, `0 entries`: the one place a printed count meets its noun."""
    if n == 1:
        return f"{n} {word}"
    return f"{n} {_IRREGULAR.get(word, word + 's')}"
