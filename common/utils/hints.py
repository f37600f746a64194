"""Hints of the form "did you mean ...?" for a mistyped name."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence

__all__ = ["close_matches", "did_you_mean", "suggestion"]


def close_matches(
    word: str, choices: Iterable[str], *, n: int = 1, cutoff: float = 0.6,
    ignore_case: bool = False,
) -> list[str]:
    """The (at most ``n``) ``choices`` closest to ``word``, best first.

    Closeness is :func:`difflib.get_close_matches`'s ratio (at least ``cutoff``). Of equally
    close choices, one with the same letters as ``word`` (two letters swapped) comes first.
    With ``ignore_case`` the comparison is on lower case, but the choices come back as given.
    """
    choices = list(choices)
    if ignore_case:
        lowered = {c.lower(): c for c in choices}
        return [lowered[c] for c in close_matches(word.lower(), lowered, n=n, cutoff=cutoff)]
    ranked = difflib.get_close_matches(word, choices, n=len(choices), cutoff=cutoff)

    def rank(choice: str) -> tuple[float, bool]:
        # the ratio get_close_matches ranked by (it compares in this order)
        ratio = difflib.SequenceMatcher(None, choice, word).ratio()
        return ratio, sorted(choice) == sorted(word)

    return sorted(ranked, key=rank, reverse=True)[:n]


def suggestion(matches: Sequence[str]) -> str:
    """``"did you mean 'a' or 'b'?"`` for ``matches``; ``""`` when there are none."""
    if not matches:
        return ""
    return "did you mean " + " or ".join(repr(m) for m in matches) + "?"


def did_you_mean(
    word: str, choices: Iterable[str], *, n: int = 1, cutoff: float = 0.6, prefix: str = "",
) -> str:
    """``prefix`` + ``"did you mean 'x'?"`` for the choices closest to ``word``
    (:func:`close_matches`), or ``""`` when none is close enough."""
    text = suggestion(close_matches(word, choices, n=n, cutoff=cutoff))
    return prefix + text if text else ""
