"""Integrity checks of a site's returned student before it is aggregated.

:func:`check_update` compares a site's update with the global student the server sent that
round: the same array names, shapes and dtypes, and only finite values. The strategy
(``fedbrats.server.protocol.build_strategy``) drops a failing update, logs and audits why, and
aggregates
the others, so one broken or malicious site cannot turn the global student into NaNs or crash the
aggregation with a shape error.

Plain numpy; works on numpy arrays, torch tensors and Flower ``Array``/``ArrayRecord`` values.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from fedbrats.common.utils.arrays import to_numpy

__all__ = ["check_update", "format_problems"]


def _describe(arr: np.ndarray) -> str:
    return f"shape {tuple(arr.shape)}, dtype {arr.dtype}"


def check_update(reference: Mapping[str, Any], update: Mapping[str, Any]) -> list[str]:
    """Problems of ``update`` against ``reference`` (the student sent); empty when it is usable.

    Each problem names the array, what was expected and what was found: a missing array, an
    unexpected one, a wrong shape, a wrong dtype, NaN or infinite values, or a value that is not
    an array at all.
    """
    problems: list[str] = []
    ref = {str(k): to_numpy(v) for k, v in reference.items()}
    for key in ref:
        if key not in update:
            problems.append(f"{key}: missing; expected an array of {_describe(ref[key])}")
    for key in update:
        if str(key) not in ref:
            try:
                found = _describe(to_numpy(update[key]))
            except Exception:  # noqa: BLE001 - we only describe it
                found = type(update[key]).__name__
            problems.append(
                f"{key}: unexpected array ({found}); expected only the student's "
                f"{len(ref)} arrays"
            )
    for key, expected in ref.items():
        if key not in update:
            continue
        try:
            found = to_numpy(update[key])
        except Exception as e:  # noqa: BLE001 - an unreadable value is a problem, not a crash
            problems.append(f"{key}: expected an array of {_describe(expected)}, found an "
                            f"unreadable {type(update[key]).__name__} ({e})")
            continue
        if found.shape != expected.shape:
            problems.append(
                f"{key}: wrong shape: expected {tuple(expected.shape)}, found {tuple(found.shape)}"
            )
        if found.dtype != expected.dtype:
            problems.append(f"{key}: wrong dtype: expected {expected.dtype}, found {found.dtype}")
        if found.dtype.kind in "fc":
            finite = np.isfinite(found)
            if not finite.all():
                n_nan = int(np.isnan(found).sum())
                n_inf = int(found.size - finite.sum()) - n_nan
                what = ", ".join(f"{n} {name}" for n, name in ((n_nan, "NaN"), (n_inf, "inf"))
                                 if n)
                problems.append(
                    f"{key}: expected finite values, found {what} among {found.size} values"
                )
        elif found.dtype.kind not in "biu":
            problems.append(f"{key}: expected numbers, found dtype {found.dtype}")
    return problems


def format_problems(problems: list[str], limit: int = 5) -> str:
    """The first ``limit`` problems on one line, with how many more there are."""
    shown = "; ".join(problems[:limit])
    more = len(problems) - limit
    return shown + (f"; and {more} more" if more > 0 else "")
