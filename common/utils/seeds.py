"""Seeds derived from names, so that every site, phase and round draws its own stream."""

from __future__ import annotations

import hashlib

__all__ = ["derived_seed"]


def derived_seed(*parts: object) -> int:
    """A 32-bit seed derived from ``parts`` (run seed, population, phase, round, ...)."""
    return int(hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()[:8], 16)
