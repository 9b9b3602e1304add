"""The one table renderer every command's table goes through: exactly what a user sees."""

from __future__ import annotations

from pipeline.table import table


def test_columns_are_as_wide_as_their_widest_cell_two_spaces_apart() -> None:
    rows = [("sha256:ab", "1.5 MiB", "disk"), ("sha256:c", "12 B", "remote")]
    assert table(("LAYER", "SIZE", "FROM"), rows, right={1}) == [
        "LAYER         SIZE  FROM",
        "sha256:ab  1.5 MiB  disk",
        "sha256:c      12 B  remote",
    ]


def test_no_line_ends_in_blanks_even_when_the_last_cell_is_short_or_empty() -> None:
    rows = [("a", "-"), ("bbbb", "")]
    lines = table(("REF", "PLATFORM"), rows)
    assert lines == ["REF   PLATFORM", "a     -", "bbbb"]


def test_rule_and_indent() -> None:
    assert table(("#", "scenario"), [("10", "tiny")], rule=True) == [
        "#   scenario",
        "--  --------",
        "10  tiny",
    ]
    assert table(("REF", "MANIFEST"), [("x:1", "sha256:d")], indent="  ") == [
        "  REF  MANIFEST",
        "  x:1  sha256:d",
    ]


def test_a_header_alone_when_there_are_no_rows() -> None:
    assert table(("LAYER", "REF", "PINNED UNTIL"), []) == ["LAYER  REF  PINNED UNTIL"]
