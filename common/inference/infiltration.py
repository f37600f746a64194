"""Infiltration risk zones around a predicted tumour, from distance transforms.

Gliomas infiltrate beyond the margin visible on MRI, most densely just outside it. InfiltrNet
(2026) derives reproducible risk zones from BraTS labels with distance transforms; fedbrats does
the same on its own segmentation, so that a planner gets the zones in the input's grid:

=====  =========================================================================================
zone   voxels
=====  =========================================================================================
1      inside the predicted oedema (SNFH), within ``inner`` mm of the whole tumour's edge: its
       infiltrative front (``inner`` large enough: all of the oedema)
2      outside the whole tumour, up to ``first`` mm from it: the first margin
3      outside the whole tumour, more than ``first`` and up to ``second`` mm from it: the second
=====  =========================================================================================

Every zone lies in the brain (the case's own foreground: what is not background in any
contrast, holes filled). Distances are Euclidean between voxel centres in millimetres
(``scipy.ndimage.distance_transform_edt`` with the voxel spacing as ``sampling``): a voxel
outside the tumour is as far from it as the nearest tumour voxel's centre, a voxel inside as far
as the nearest centre outside, so the tumour's outermost layer is one voxel deep. A zone's edge
follows the grid's spacing: on a 1 x 1 x 3 mm grid a 6 mm margin is 6 voxels deep in-plane and
2 across slices. numpy and scipy only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from fedbrats.common.data.contract import LABELS, region_masks

SNFH = next(v for v, name in LABELS.items() if name == "SNFH")

ZONE_NAMES = ("oedema front", "first margin", "second margin")
"""Zone ``k`` (1, 2, 3) is ``ZONE_NAMES[k - 1]``."""

ZONES_ARGUMENT = "INNER,FIRST,SECOND"


def parse_zone_edges(text: str) -> tuple[float, float, float]:
    """``"5,10,20"`` -> ``(5.0, 10.0, 20.0)``: the oedema front's depth, the first margin's
    and the second margin's outer edges, in mm; ``ValueError`` saying what was expected."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 3 or not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"--infiltration-zones {text!r}: expected {ZONES_ARGUMENT}, three "
                         "positive distances in mm (for example 5,10,20)")
    inner, first, second = values
    if not first < second:
        raise ValueError(f"--infiltration-zones {text!r}: the second margin's edge ({second:g} "
                         f"mm) must lie beyond the first's ({first:g} mm)")
    return inner, first, second


def brain_of(image: np.ndarray) -> np.ndarray:
    """The brain of a ``C, H, W, D`` image whose background is 0 (as the data checks leave
    it): voxels non-zero in any contrast, with holes filled."""
    from scipy import ndimage

    return ndimage.binary_fill_holes(np.any(np.asarray(image) != 0, axis=0))


def infiltration_zones(
    labels: np.ndarray,
    brain: np.ndarray,
    spacing: Sequence[float],
    edges: Sequence[float],
) -> np.ndarray:
    """The zone map (``uint8``, 0 outside every zone, 1-3 as in the module docstring) of an
    internal-convention label map ``labels`` on a grid of ``spacing`` mm; ``edges`` is
    ``(inner, first, second)`` in mm. An empty tumour gives an empty map."""
    from scipy import ndimage

    inner, first, second = (float(e) for e in edges)
    labels = np.asarray(labels)
    brain = np.asarray(brain, dtype=bool)
    if labels.shape != brain.shape:
        raise ValueError(f"labels {labels.shape} and brain mask {brain.shape} differ in shape")
    wt = region_masks(labels, "WT")
    zones = np.zeros(labels.shape, dtype=np.uint8)
    if not wt.any():
        return zones
    sampling = tuple(float(s) for s in spacing)
    outside = ndimage.distance_transform_edt(~wt, sampling=sampling)  # to the nearest WT voxel
    inside = ndimage.distance_transform_edt(wt, sampling=sampling)  # to the nearest non-WT voxel
    zones[(labels == SNFH) & (inside <= inner) & brain] = 1
    zones[~wt & brain & (outside <= first)] = 2
    zones[~wt & brain & (outside > first) & (outside <= second)] = 3
    return zones


def zone_volumes(zones: np.ndarray, spacing: Sequence[float]) -> dict[str, float]:
    """``{zone name: volume in mm^3}`` of a zone map."""
    voxel = float(np.prod([float(s) for s in spacing]))
    counts = np.bincount(np.asarray(zones, dtype=np.int64).ravel(), minlength=4)
    return {name: float(counts[k + 1]) * voxel for k, name in enumerate(ZONE_NAMES)}


__all__ = ["ZONE_NAMES", "brain_of", "infiltration_zones", "parse_zone_edges", "zone_volumes"]
