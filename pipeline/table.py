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
    if bad := set(map(len, rows)) - {len(header)}:
        raise ValueError(f"a row of {min(bad)} cells in a table of {len(header)} columns")
    # Column by column, in C (zip, map, max): a ten-thousand-row listing would otherwise
    # cost a Python-level step for every cell.
    widths = [max(map(len, column)) for column in zip(header, *rows, strict=True)]
    # One printf-style template for every row: a listing of ten thousand files is formatted
    # in C, not cell by cell in Python (and `%` is a third faster than str.format here).
    # Cells are arguments to it, never parsed: a `%` or a brace in a cell is just text.
    line = indent.replace("%", "%%") + "  ".join(
        f"%{'' if i in right else '-'}{w}s" for i, w in enumerate(widths))
    lines = [(line % tuple(header)).rstrip()]
    if rule:
        lines.append(indent + "  ".join("-" * w for w in widths))
    lines.extend([(line % tuple(r)).rstrip() for r in rows])
    return lines


# Words whose plural is not the word plus "s"; every other counted noun just takes an "s".
_IRREGULAR = {"entry": "entries"}


def counted(n: int, word: str) -> str:
    """`1 layer`, `3 layers`, `0 entries`: the one place a printed count meets its noun."""
    if n == 1:
        return f"{n} {word}"
    return f"{n} {_IRREGULAR.get(word, word + 's')}"
