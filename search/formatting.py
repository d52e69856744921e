"""Small value helpers shared by the leaderboard, `detsweep status` and the report's tables."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["finite_float", "format_or_dash"]


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
