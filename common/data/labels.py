"""Label conventions that sites really have, and their conversion to the internal one.

The internal convention (``fedbrats.common.data.contract``) is BraTS 2023's: 0 background,
1 NETC, 2 SNFH, 3 ET.

=================  ====================================================  ======================
convention         source labels                                         to internal
=================  ====================================================  ======================
``brats2015``      1 necrosis, 2 oedema, 3 non-enhancing, 4 enhancing    1->1, 2->2, 3->1, 4->3
``brats2021``      1 NCR/NET, 2 oedema, 4 enhancing (BraTS 2017-2021)    1->1, 2->2, 4->3
``brats2023``      1 NETC, 2 SNFH, 3 ET (2023 GLI, SSA, MEN, MET)        identity
``brats2024-ped``  1 ET, 2 NETC, 3 cystic component, 4 oedema           1->3, 2->1, 3->1, 4->2
``brats2024-gli``  1 NETC, 2 SNFH, 3 ET, 4 resection cavity             4->0 (outside WT)
=================  ====================================================  ======================

Cysts in paediatric tumours belong to the tumour core (BraTS-PED 2024 counts them in TC and WT), so
they become NETC. A resection cavity is not tumour and becomes background.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import numpy as np

from fedbrats.common.utils.hints import did_you_mean


class LabelError(ValueError):
    """A segmentation holds label values that its convention does not define."""


@dataclass(frozen=True)
class LabelConvention:
    name: str
    description: str
    to_internal: dict[int, int]
    """Source value -> internal value; value 0 (background) is always allowed and maps to 0."""
    from_internal: dict[int, int]
    """Internal value -> the value written when exporting in this convention."""

    @property
    def allowed(self) -> tuple[int, ...]:
        return tuple(sorted({0, *self.to_internal}))


CONVENTIONS: Final[dict[str, LabelConvention]] = {
    c.name: c
    for c in (
        LabelConvention(
            "brats2015",
            "BraTS 2015: 1 necrosis, 2 oedema, 3 non-enhancing, 4 enhancing",
            {1: 1, 2: 2, 3: 1, 4: 3},
            {1: 1, 2: 2, 3: 4},
        ),
        LabelConvention(
            "brats2021",
            "BraTS 2017-2021: 1 necrotic/non-enhancing core, 2 oedema, 4 enhancing",
            {1: 1, 2: 2, 4: 3},
            {1: 1, 2: 2, 3: 4},
        ),
        LabelConvention(
            "brats2023",
            "BraTS 2023 GLI/SSA/MEN/MET: 1 NETC, 2 SNFH, 3 ET",
            {1: 1, 2: 2, 3: 3},
            {1: 1, 2: 2, 3: 3},
        ),
        LabelConvention(
            "brats2024-ped",
            "BraTS 2024 PED: 1 ET, 2 NETC, 3 cystic component, 4 oedema",
            {1: 3, 2: 1, 3: 1, 4: 2},
            {1: 2, 2: 4, 3: 1},
        ),
        LabelConvention(
            "brats2024-gli",
            "BraTS 2024 GLI post-treatment: 1 NETC, 2 SNFH, 3 ET, 4 resection cavity",
            {1: 1, 2: 2, 3: 3, 4: 0},
            {1: 1, 2: 2, 3: 3},
        ),
    )
}

DEFAULT_CONVENTION: Final[str] = "brats2023"


def get_convention(name: str) -> LabelConvention:
    """Look up a convention by name, suggesting the nearest on a typo."""
    key = name.strip().lower()
    if key in CONVENTIONS:
        return CONVENTIONS[key]
    hint = did_you_mean(key, CONVENTIONS, prefix="; ")
    raise ValueError(
        f"unknown label convention {name!r}; expected one of {', '.join(CONVENTIONS)}{hint}"
    )


def suggest_conventions(values: set[int] | tuple[int, ...]) -> list[str]:
    """Conventions under which every value in ``values`` is defined, most specific first."""
    vals = {int(v) for v in values} - {0}
    fits = [c for c in CONVENTIONS.values() if vals <= set(c.to_internal)]
    # Prefer the convention that uses the values most fully (fewest undefined extras).
    fits.sort(key=lambda c: len(set(c.to_internal) - vals))
    return [c.name for c in fits]


def _lut(mapping: dict[int, int]) -> np.ndarray:
    lut = np.full(256, 255, dtype=np.uint8)
    lut[0] = 0
    for src, dst in mapping.items():
        lut[src] = dst
    return lut


def to_internal(
    seg: np.ndarray, convention: str = DEFAULT_CONVENTION, source: str = ""
) -> np.ndarray:
    """Convert a label map from ``convention`` to the internal one (uint8, values 0-3).

    Raises ``LabelError`` naming ``source`` (a file name), the values found and the values the
    convention allows, with the conventions the values would fit.
    """
    conv = get_convention(convention)
    arr = np.asarray(seg)
    if not np.issubdtype(arr.dtype, np.integer):
        rounded = np.rint(arr)
        if not np.array_equal(rounded, arr):
            raise LabelError(
                f"{source or 'segmentation'}: expected integer label values, found non-integer "
                f"values (dtype {arr.dtype})"
            )
        arr = rounded
    found = np.unique(arr)
    bad = [int(v) for v in found if int(v) not in conv.allowed]
    if bad:
        found_s = "{" + ", ".join(str(int(v)) for v in found) + "}"
        fits = [n for n in suggest_conventions(set(found.tolist())) if n != conv.name]
        hint = f"; these values fit {', '.join(fits)} (pass --labels {fits[0]})" if fits else ""
        raise LabelError(
            f"{source or 'segmentation'}: label values {bad} are not in convention {conv.name} "
            f"(expected a subset of {set(conv.allowed)}, found {found_s}){hint}"
        )
    return _lut(conv.to_internal)[arr.astype(np.int64)]


def from_internal(seg: np.ndarray, convention: str = DEFAULT_CONVENTION) -> np.ndarray:
    """Convert an internal label map (values 0-3) to ``convention`` for export (uint8)."""
    conv = get_convention(convention)
    arr = np.asarray(seg)
    if arr.size and (arr.min() < 0 or arr.max() > 3):
        raise LabelError(f"internal label maps hold values 0-3, found {np.unique(arr).tolist()}")
    return _lut(conv.from_internal)[arr.astype(np.int64)]


def add_labels_argument(parser, of: str, flag: str = "--labels") -> None:
    """A command's ``--labels CONVENTION`` option: which label convention ``of`` uses."""
    parser.add_argument(
        flag, metavar="CONVENTION", default=DEFAULT_CONVENTION, choices=sorted(CONVENTIONS),
        help=f"label convention of {of} (default {DEFAULT_CONVENTION}; "
        f"one of {', '.join(CONVENTIONS)})",
    )
