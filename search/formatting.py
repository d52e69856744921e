"""Small value helpers and the table writers shared by the leaderboard, `detsweep status` and the report."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["finite_float", "format_or_dash", "html_table", "markdown_table"]


def finite_float(value: Any) -> float | None:
    """`value` as a finite float, or None (missing, not a number, nan or inf)."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def format_or_dash(value: Any, spec: str) -> str:
    """`format(value, spec)`, or "-" for a missing value (table cells)."""
    return "-" if value is None else format(value, spec)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A Markdown table of formatted cells: the header line, its `|---|` rule, one line per row."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines.extend("| " + " | ".join(row) + " |" for row in rows)
    return "\n".join(lines)


def html_table(header: Sequence[str] | None, rows: Iterable[Sequence[str]], *, table_class: str | None = None,
               row_classes: Sequence[str | None] | None = None, header_column: bool = False,
               footer: Sequence[str] | None = None) -> str:
    """An HTML table of cells that are already HTML (escaped by the caller).

    `header`: the `<th>` row (None: no header row). `row_classes[i]`: the CSS class of row i (None: none).
    `header_column`: every row's first cell is a `<th>` (a key/value table). `footer`: a last row whose
    first cell is a `<th>` (a totals row).
    """
    def row(cells: Sequence[str], *, heads: int = 0, css: str | None = None) -> str:
        attr = f' class="{css}"' if css else ""
        return (f"<tr{attr}>" + "".join(f"<th>{c}</th>" for c in cells[:heads])
                + "".join(f"<td>{c}</td>" for c in cells[heads:]) + "</tr>")

    attr = f' class="{table_class}"' if table_class else ""
    parts = [f"<table{attr}>"]
    if header is not None:
        parts.append(row(header, heads=len(header)))
    for i, cells in enumerate(rows):
        parts.append(row(cells, heads=int(header_column), css=row_classes[i] if row_classes else None))
    if footer is not None:
        parts.append(row(footer, heads=1))
    parts.append("</table>")
    return "".join(parts)
