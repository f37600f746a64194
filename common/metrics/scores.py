"""Averaging per-case scores: shared by the sites (validation summaries) and the server's report.

Pure Python, no numpy or torch, so that importing it costs nothing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

COUNT_KEYS: frozenset[str] = frozenset({"tp", "fn", "fp"})
"""Per-case counts that :func:`mean_metrics` sums instead of averaging."""


def finite_or_none(value: Any) -> float | None:
    """``value`` as a finite float, or ``None`` (missing, NaN, infinite, bool or not a number)."""
    if value is None or isinstance(value, (bool, str, bytes)):
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def mean_metrics(per_case: list[dict]) -> dict:
    """Mean over cases of nested ``{region: {metric: value}}`` dicts.

    Numbers are averaged ignoring NaN, infinities and ``None`` (``nan`` where a key has no finite
    value at all); the counts ``tp``/``fn``/``fp`` are summed (as ints when every term is an int).
    Nesting is followed to any depth; keys missing from some cases average over the others;
    non-numeric leaves (strings, lists such as per-lesion details) are left out.
    ``mean_metrics([])`` is ``{}``.
    """
    cases = [c for c in per_case if isinstance(c, Mapping)]
    return _mean_nested(cases)


def _mean_nested(cases: list[Mapping]) -> dict:
    keys: list[str] = []
    for case in cases:
        for key in case:
            if key not in keys:
                keys.append(key)
    out: dict = {}
    for key in keys:
        values = [case[key] for case in cases if key in case]
        subs = [v for v in values if isinstance(v, Mapping)]
        if subs:
            out[key] = _mean_nested(subs)
            continue
        numeric = [v for v in values if _is_number(v)]
        if not numeric:
            continue
        finite = [float(v) for v in numeric if finite_or_none(v) is not None]
        if key in COUNT_KEYS:
            total = sum(finite)
            exact = all(
                isinstance(v, int) or float(v).is_integer()
                for v in numeric
                if finite_or_none(v) is not None
            )
            out[key] = int(total) if exact else total
        else:
            out[key] = sum(finite) / len(finite) if finite else float("nan")
    return out


def _is_number(value: Any) -> bool:
    if value is None:
        return True  # a missing measurement: counts as "no value", not as a non-numeric leaf
    if isinstance(value, (bool, str, bytes)):
        return False
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True
