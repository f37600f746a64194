"""GitHub markdown tables."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["markdown_cell", "markdown_table"]

_ALIGN_MARKS = {"l": ":---", "r": "---:", "c": ":---:"}


def markdown_cell(value: Any) -> str:
    """``value`` as the text of one table cell: ``|`` escaped, newlines as spaces."""
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(header: Sequence[Any], rows: Sequence[Sequence[Any]],
                   align: Sequence[str] | None = None) -> str:
    """A GitHub markdown table; ``align`` per column: ``l``, ``r`` or ``c`` (all ``l`` if None)."""
    align = align or ["l"] * len(header)
    out = ["| " + " | ".join(markdown_cell(h) for h in header) + " |",
           "|" + "|".join(_ALIGN_MARKS[a] for a in align) + "|"]
    out += ["| " + " | ".join(markdown_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(out)
