"""The fedbrats data contract: written down once, pinned by ``tests/common/data/test_contract.py``.

Every image that enters a network, every label map a loss or metric sees, and every population name
follows this module. Site data in other conventions is converted on load (``fedbrats.common.data.labels``).

Input channels (axis 1 of a ``B, C, H, W, D`` batch), in this order:

==  =====  ======================================  ===============================
ch  key    contrast                                BraTS 2023 file suffix
==  =====  ======================================  ===============================
0   t1n    native T1-weighted                      ``-t1n.nii.gz``
1   t1c    contrast-enhanced (gadolinium) T1       ``-t1c.nii.gz``
2   t2w    T2-weighted                             ``-t2w.nii.gz``
3   t2f    T2-FLAIR                                ``-t2f.nii.gz``
==  =====  ======================================  ===============================

Labels (one integer per voxel): 0 background, 1 NETC (necrotic and non-enhancing tumour core),
2 SNFH (surrounding non-enhancing FLAIR hyperintensity, i.e. oedema), 3 ET (enhancing tumour).

Evaluated regions, nested: WT (whole tumour) = {1, 2, 3}; TC (tumour core) = {1, 3}; ET = {3}.

A contrast that a case lacks is filled with zeros *after* z-score normalisation, that is with the
brain's mean intensity of that contrast; ``present`` in each loaded sample records which channels
were real. This is the same input the student sees when modality dropout removes a contrast.
"""

from __future__ import annotations

from typing import Final

CONTRASTS: Final[tuple[str, ...]] = ("t1n", "t1c", "t2w", "t2f")
"""Channel order of every network input."""

CONTRAST_NAMES: Final[dict[str, str]] = {
    "t1n": "native T1",
    "t1c": "contrast-enhanced T1",
    "t2w": "T2-weighted",
    "t2f": "T2-FLAIR",
}

LABELS: Final[dict[int, str]] = {0: "background", 1: "NETC", 2: "SNFH", 3: "ET"}
"""Internal label values."""

NUM_CLASSES: Final[int] = len(LABELS)

REGIONS: Final[dict[str, tuple[int, ...]]] = {"WT": (1, 2, 3), "TC": (1, 3), "ET": (3,)}
"""Evaluated regions as sets of internal labels, in reporting order."""

POPULATIONS: Final[tuple[str, ...]] = ("GLI", "SSA", "PED", "MEN", "MET")
"""The five BraTS populations (sub-challenges), in reporting order."""

POPULATION_NAMES: Final[dict[str, str]] = {
    "GLI": "adult glioma",
    "SSA": "glioma, Sub-Saharan Africa",
    "PED": "paediatric tumours",
    "MEN": "meningioma",
    "MET": "brain metastases",
}

SEG_KEY: Final[str] = "seg"


def region_masks(labels, region: str):
    """Boolean mask of ``region`` ("WT", "TC" or "ET") in an internal-convention label array.

    Works for numpy arrays and torch tensors alike.
    """
    if region not in REGIONS:
        raise ValueError(f"unknown region {region!r}; expected one of {', '.join(REGIONS)}")
    values = REGIONS[region]
    mask = labels == values[0]
    for v in values[1:]:
        mask = mask | (labels == v)
    return mask


def check_population(name: str) -> str:
    """Return the canonical population code for ``name`` (case-insensitive), or raise."""
    code = name.strip().upper()
    if code not in POPULATIONS:
        raise ValueError(
            f"unknown population {name!r}; expected one of {', '.join(POPULATIONS)}"
        )
    return code
