"""Segmentation metrics: per-region Dice and HD95, and BraTS 2023 lesion-wise Dice and HD95.

All functions take integer label maps in the internal convention of
:mod:`fedbrats.common.data.contract`
(0 background, 1 NETC, 2 SNFH, 3 ET), shaped ``H, W, D``, and report the nested regions
WT = {1, 2, 3}, TC = {1, 3} and ET = {3}. ``spacing`` is the voxel size in mm along the three array
axes, in array order; every distance is in mm and every volume in mm^3.

Region-level ("legacy") scores, :func:`region_dice_hd95`
    Dice and the 95th-percentile symmetric Hausdorff distance of the whole region, computed with
    MONAI (``compute_dice``; ``compute_hausdorff_distance`` with ``percentile=95`` and ``spacing``).
    MONAI has no usable answer for empty masks (Dice is NaN for an empty ground truth; HD95 is NaN
    when either mask is empty), so the empty cases are decided here, before MONAI is called:

    * prediction and ground truth both empty: Dice 1, HD95 0;
    * exactly one of them empty: Dice 0, HD95 374 (:data:`HD95_MAX_MM`, BraTS's stand-in for an
      infinite distance: about the diagonal of a 240 x 240 x 155 mm volume).

Lesion-wise scores, :func:`lesion_wise` and :func:`lesion_wise_mask`
    The BraTS 2023 definition, re-implemented from a reading of the official evaluation code
    (``BraTS-2023-Metrics``, ``get_LesionWiseScores`` / ``get_lesion_wise_results``). Per region:

    1. The ground-truth mask is dilated ``dilation`` times (scipy ``binary_dilation``) and the
       dilated mask is split into 26-connected components. Each ground-truth *lesion* is the set of
       original ground-truth voxels inside one dilated component, so lesions closer than the
       dilation merge; the ground truth itself is never changed.
    2. The prediction is split into 26-connected components. A lesion's *match* is every predicted
       component that intersects the lesion's dilated region (touching it is enough; overlapping
       the lesion itself is not required). The lesion's Dice and HD95 are computed between the
       lesion and the union of its whole matched components (HD95 374 when nothing matched).
       A predicted component that spans two lesions' regions is matched by both.
    3. Lesions of volume ``<= threshold_mm3`` (voxel count x voxel volume) are dropped from the
       average and from the tp/fn counts. As in the official code, a predicted component matched
       only by a dropped lesion is *not* a false positive: it is simply ignored.
    4. Every predicted component matched by no lesion (kept or dropped) is a false positive and
       scores Dice 0, HD95 374.
    5. ``dice = sum(kept lesion Dice) / (n_kept + n_fp)`` and
       ``hd95 = (sum(kept lesion HD95) + 374 * n_fp) / (n_kept + n_fp)``. When the denominator is 0
       (both masks empty, or only dropped lesions and no false positive) the official code divides
       0 by 0 and replaces the NaN: Dice 1, HD95 0. Ground truth empty but prediction not: Dice 0,
       HD95 374.

    Counts: ``tp`` = kept lesions with at least one matched component, ``fn`` = kept lesions with
    none, ``fp`` = unmatched predicted components (the official ``Num_TP``, ``Num_FN``,
    ``Num_FP``).

Where this module knowingly differs from the official code (all documented choices):

* Dilation structuring element: the official code dilates with
  ``generate_binary_structure(3, 2)`` (the 18-neighbourhood: faces and edges, not corners), not
  the full 26-neighbourhood; this module follows the official code (:data:`DILATION_STRUCTURE`).
  Connected components, as in the official code (``cc3d`` with ``connectivity=26``), use the full
  26-neighbourhood (:data:`CONNECTIVITY_STRUCTURE`).
* Surface distances: the official code uses DeepMind's ``surface_distance`` package (surfel-area
  weighted percentiles on voxel-corner surfaces); this module uses MONAI (edge voxels, plain
  linear-interpolated percentile), so HD95 values can differ by a fraction of a voxel. Dice is
  identical.
* The official code never caps HD95 except for infinities; neither does this module.

Sub-challenge parameters (:data:`LESION_PARAMS`), checked against the official
``get_challenge_parameters``: GLI, SSA, PED dilation 3, threshold 50 mm^3; MEN dilation 1,
threshold 50 mm^3; MET dilation 1, threshold 2 mm^3. No discrepancy with the brief.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance
from scipy import ndimage

from fedbrats.common.data.contract import LABELS, POPULATIONS, REGIONS, region_masks
from fedbrats.common.utils.arrays import to_numpy
from fedbrats.common.utils.hints import did_you_mean

__all__ = [
    "CONNECTIVITY_STRUCTURE",
    "DILATION_STRUCTURE",
    "HD95_MAX_MM",
    "LESION_PARAMS",
    "LesionDetail",
    "LesionParams",
    "LesionWiseScore",
    "RegionScore",
    "evaluate_case",
    "lesion_wise",
    "lesion_wise_mask",
    "region_dice_hd95",
    "resolve_challenge",
]

HD95_MAX_MM: Final[float] = 374.0
"""HD95 given to a missed lesion, a false positive or a region present in only one mask."""

DILATION_STRUCTURE: Final[np.ndarray] = ndimage.generate_binary_structure(3, 2)
"""Structuring element of the ground-truth dilation: the 18-neighbourhood (official code)."""

CONNECTIVITY_STRUCTURE: Final[np.ndarray] = ndimage.generate_binary_structure(3, 3)
"""Connected-component labelling: the full 26-neighbourhood."""

_VALID_LABELS: Final[tuple[int, ...]] = tuple(LABELS)


# --------------------------------------------------------------------------------------------
# Result types
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LesionParams:
    """Lesion-wise parameters of one sub-challenge."""

    dilation: int
    """Number of ground-truth dilation iterations."""
    threshold_mm3: float
    """Lesions of volume at or under this (mm^3) are left out of the scores."""

    def to_dict(self) -> dict[str, Any]:
        return {"dilation": int(self.dilation), "threshold_mm3": float(self.threshold_mm3)}


LESION_PARAMS: Final[dict[str, LesionParams]] = {
    "GLI": LesionParams(dilation=3, threshold_mm3=50.0),
    "SSA": LesionParams(dilation=3, threshold_mm3=50.0),
    "PED": LesionParams(dilation=3, threshold_mm3=50.0),
    "MEN": LesionParams(dilation=1, threshold_mm3=50.0),
    "MET": LesionParams(dilation=1, threshold_mm3=2.0),
}
"""BraTS 2023 lesion-wise parameters per sub-challenge (official ``get_challenge_parameters``)."""

assert tuple(LESION_PARAMS) == POPULATIONS


@dataclass(frozen=True)
class RegionScore:
    """Region-level Dice and HD95 (mm)."""

    dice: float
    hd95: float

    def to_dict(self) -> dict[str, float]:
        return {"dice": float(self.dice), "hd95": float(self.hd95)}


@dataclass(frozen=True)
class LesionDetail:
    """One ground-truth lesion (after merging by dilation)."""

    volume_mm3: float
    dice: float
    hd95: float
    n_pred: int
    """Number of predicted components matched to this lesion."""
    kept: bool
    """False when the lesion is at or under the volume threshold (left out of the scores)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "volume_mm3": float(self.volume_mm3),
            "dice": float(self.dice),
            "hd95": float(self.hd95),
            "n_pred": int(self.n_pred),
            "kept": bool(self.kept),
        }


@dataclass(frozen=True)
class LesionWiseScore:
    """Lesion-wise Dice and HD95 (mm) of one region, with lesion counts and per-lesion details."""

    dice: float
    hd95: float
    tp: int
    fn: int
    fp: int
    lesions: tuple[LesionDetail, ...] = ()
    """Every ground-truth lesion, kept or not, in labelling (raster) order."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "dice": float(self.dice),
            "hd95": float(self.hd95),
            "tp": int(self.tp),
            "fn": int(self.fn),
            "fp": int(self.fp),
            "lesions": [lesion.to_dict() for lesion in self.lesions],
        }


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def resolve_challenge(name: str) -> str:
    """Canonical sub-challenge code: ``"gli"``, ``"GLI"`` and ``"BraTS-GLI"`` all give ``"GLI"``."""
    if not isinstance(name, str):
        raise TypeError(f"challenge must be a string, got {type(name).__name__}")
    code = name.strip().upper()
    for prefix in ("BRATS-", "BRATS_", "BRATS"):
        if code.startswith(prefix):
            code = code[len(prefix) :]
            break
    if code in LESION_PARAMS:
        return code
    hint = did_you_mean(code, LESION_PARAMS, prefix="; ")
    raise ValueError(
        f"unknown challenge {name!r}: expected one of {', '.join(LESION_PARAMS)}{hint}"
    )


def _check_spacing(spacing: Sequence[float] | float) -> tuple[float, float, float]:
    if np.isscalar(spacing):
        spacing = (spacing,) * 3  # type: ignore[assignment]
    sp = tuple(float(s) for s in spacing)  # type: ignore[union-attr]
    if len(sp) != 3:
        raise ValueError(f"spacing must have 3 values (one per array axis), got {spacing!r}")
    if not all(math.isfinite(s) and s > 0 for s in sp):
        raise ValueError(f"spacing values must be positive and finite, got {spacing!r}")
    return sp  # type: ignore[return-value]


def _check_pair_shapes(pred: np.ndarray, gt: np.ndarray) -> None:
    if pred.shape != gt.shape:
        raise ValueError(
            f"prediction and ground truth shapes differ: pred {tuple(pred.shape)} "
            f"vs gt {tuple(gt.shape)}"
        )
    if pred.ndim != 3:
        raise ValueError(f"expected 3-D arrays (H, W, D), got shape {tuple(pred.shape)}")


def _check_labels(arr: np.ndarray, name: str) -> np.ndarray:
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"{name} must be an integer label map, got dtype {arr.dtype}")
    if arr.size:
        lo, hi = arr.min(), arr.max()
        ok = lo >= 0 and hi <= max(_VALID_LABELS)
        if ok and not np.issubdtype(arr.dtype, np.integer):
            ok = bool(np.all(arr == np.round(arr)))
        if not ok:
            bad = np.setdiff1d(np.unique(arr), np.asarray(_VALID_LABELS))
            raise ValueError(
                f"{name} has label values {bad.tolist()[:8]} outside {list(_VALID_LABELS)}"
            )
    return arr


def _check_label_pair(pred: Any, gt: Any) -> tuple[np.ndarray, np.ndarray]:
    p, g = to_numpy(pred), to_numpy(gt)
    _check_pair_shapes(p, g)
    return _check_labels(p, "pred"), _check_labels(g, "gt")


def _check_mask_pair(pred: Any, gt: Any) -> tuple[np.ndarray, np.ndarray]:
    p, g = to_numpy(pred), to_numpy(gt)
    _check_pair_shapes(p, g)
    return p.astype(bool, copy=False), g.astype(bool, copy=False)


# --------------------------------------------------------------------------------------------
# Dice and HD95 of one pair of masks (MONAI)
# --------------------------------------------------------------------------------------------


def _bbox(mask: np.ndarray, margin: int = 0) -> tuple[slice, ...] | None:
    """Bounding box of ``mask`` grown by ``margin`` voxels, clipped to the array; None if empty."""
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        idx = np.flatnonzero(mask.any(axis=other))
        if idx.size == 0:
            return None
        start, stop = int(idx[0]) - margin, int(idx[-1]) + 1 + margin
        box.append(slice(max(start, 0), min(stop, mask.shape[axis])))
    return tuple(box)


def _union_box(boxes: Sequence[tuple[slice, ...]], shape: tuple[int, ...], margin: int):
    return tuple(
        slice(
            max(min(b[a].start for b in boxes) - margin, 0),
            min(max(b[a].stop for b in boxes) + margin, shape[a]),
        )
        for a in range(len(shape))
    )


def _dice_hd95(
    pred: np.ndarray,
    gt: np.ndarray,
    spacing: tuple[float, float, float],
    monai_dice: bool = True,
) -> tuple[float, float]:
    """Dice and HD95 (mm) of two boolean masks, with the empty conventions of this module.

    Both are cropped to the bounding box of their union grown by one voxel (clipped to the array),
    which leaves MONAI's edge extraction, and so the result, unchanged. HD95 always comes from
    MONAI; Dice too unless ``monai_dice`` is False (then the same formula, ``2|P&G| / (|P|+|G|)``,
    in numpy, which is several times faster on the many small crops of the lesion-wise loop).
    """
    p_any, g_any = bool(pred.any()), bool(gt.any())
    if not p_any and not g_any:
        return 1.0, 0.0
    if not p_any or not g_any:
        return 0.0, HD95_MAX_MM
    box = _bbox(pred | gt, margin=1)
    p = torch.from_numpy(np.ascontiguousarray(pred[box]))[None, None]
    g = torch.from_numpy(np.ascontiguousarray(gt[box]))[None, None]
    if monai_dice:
        dice = float(compute_dice(p, g, include_background=True, ignore_empty=False).item())
    else:
        pc, gc = pred[box], gt[box]
        inter = np.count_nonzero(pc & gc)
        dice = 2.0 * inter / (np.count_nonzero(pc) + np.count_nonzero(gc))
    with warnings.catch_warnings():
        # MONAI 1.6 warns about its own deprecated argument inside get_mask_edges.
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"monai\..*")
        hd = compute_hausdorff_distance(
            p, g, include_background=True, percentile=95, spacing=list(spacing)
        )
    return float(dice), float(hd.item())


# --------------------------------------------------------------------------------------------
# Region-level scores
# --------------------------------------------------------------------------------------------


def _region_scores(
    pred: np.ndarray, gt: np.ndarray, spacing: tuple[float, float, float]
) -> dict[str, RegionScore]:
    out = {}
    for region in REGIONS:
        dice, hd95 = _dice_hd95(
            np.asarray(region_masks(pred, region)), np.asarray(region_masks(gt, region)), spacing
        )
        out[region] = RegionScore(dice=dice, hd95=hd95)
    return out


def region_dice_hd95(
    pred: Any, gt: Any, spacing: Sequence[float] | float = (1.0, 1.0, 1.0)
) -> dict[str, RegionScore]:
    """Dice and HD95 (mm) of each region WT, TC, ET between two label maps (``H, W, D``).

    Computed with MONAI's ``compute_dice`` and ``compute_hausdorff_distance(percentile=95,
    spacing=spacing)``. Empty conventions (decided here; MONAI would return NaN): both masks of a
    region empty -> Dice 1, HD95 0; exactly one empty -> Dice 0, HD95 374.
    """
    p, g = _check_label_pair(pred, gt)
    return _region_scores(p, g, _check_spacing(spacing))


# --------------------------------------------------------------------------------------------
# Lesion-wise scores
# --------------------------------------------------------------------------------------------


def _lesion_wise(
    pred: np.ndarray,
    gt: np.ndarray,
    spacing: tuple[float, float, float],
    dilation: int,
    threshold_mm3: float,
) -> LesionWiseScore:
    voxel_mm3 = spacing[0] * spacing[1] * spacing[2]
    shape = gt.shape

    pred_cc, n_pred = ndimage.label(pred, structure=CONNECTIVITY_STRUCTURE)
    pred_boxes = ndimage.find_objects(pred_cc)

    gt_box = _bbox(gt, margin=dilation)
    if gt_box is None:  # no ground truth: every predicted component is a false positive
        if n_pred == 0:
            return LesionWiseScore(dice=1.0, hd95=0.0, tp=0, fn=0, fp=0)
        return LesionWiseScore(dice=0.0, hd95=HD95_MAX_MM, tp=0, fn=0, fp=n_pred)

    # Dilate and label inside the ground truth's box grown by the dilation: the dilated mask cannot
    # leave it, and the array border is background either way, so the labels are those of the
    # full array.
    gt_crop = gt[gt_box]
    dilated = (
        ndimage.binary_dilation(gt_crop, structure=DILATION_STRUCTURE, iterations=dilation)
        if dilation > 0  # scipy reads iterations=0 as "until nothing changes"
        else gt_crop
    )
    dil_cc, n_lesions = ndimage.label(dilated, structure=CONNECTIVITY_STRUCTURE)
    dil_boxes = ndimage.find_objects(dil_cc)
    offset = tuple(s.start for s in gt_box)

    # Ground-truth lesions (original voxels labelled by their dilated component), full size.
    lesion_map = np.zeros(shape, dtype=np.int32)
    lesion_map[gt_box] = np.where(gt_crop, dil_cc, 0)

    matched_any: set[int] = set()
    details = []
    for i in range(1, n_lesions + 1):
        local = dil_boxes[i - 1]
        region_box = tuple(
            slice(s.start + o, s.stop + o) for s, o in zip(local, offset, strict=True)
        )
        # A lesion's dilated region is its dilated component (the dilation of the lesion's voxels).
        labels_here = pred_cc[region_box][dil_cc[local] == i]
        matched = np.unique(labels_here[labels_here > 0])
        matched_any.update(int(m) for m in matched)

        boxes = [region_box] + [pred_boxes[m - 1] for m in matched]
        box = _union_box(boxes, shape, margin=1)
        lesion = lesion_map[box] == i
        pred_union = np.isin(pred_cc[box], matched) if matched.size else np.zeros_like(lesion)
        dice, hd95 = _dice_hd95(pred_union, lesion, spacing, monai_dice=False)
        volume = float(np.count_nonzero(lesion)) * voxel_mm3
        details.append(
            LesionDetail(
                volume_mm3=volume,
                dice=dice,
                hd95=hd95,
                n_pred=int(matched.size),
                kept=volume > threshold_mm3,
            )
        )

    n_fp = n_pred - len(matched_any)
    kept = [d for d in details if d.kept]
    tp = sum(1 for d in kept if d.n_pred > 0)
    fn = len(kept) - tp
    denom = len(kept) + n_fp
    if denom == 0:  # official: 0/0 -> NaN -> Dice 1, HD95 0
        dice, hd95 = 1.0, 0.0
    else:
        dice = sum(d.dice for d in kept) / denom
        hd95 = (sum(d.hd95 for d in kept) + HD95_MAX_MM * n_fp) / denom
    return LesionWiseScore(
        dice=float(dice), hd95=float(hd95), tp=tp, fn=fn, fp=n_fp, lesions=tuple(details)
    )


def lesion_wise_mask(
    pred_mask: Any,
    gt_mask: Any,
    spacing: Sequence[float] | float = (1.0, 1.0, 1.0),
    dilation: int = 3,
    threshold_mm3: float = 50.0,
) -> LesionWiseScore:
    """BraTS 2023 lesion-wise Dice and HD95 of one binary region mask (see the module docstring).

    ``dilation`` is the number of ground-truth dilation iterations (0: no merging) and
    ``threshold_mm3`` the volume at or under which a ground-truth lesion is left out. Both empty ->
    Dice 1, HD95 0; ground truth empty but prediction not -> Dice 0, HD95 374.
    """
    p, g = _check_mask_pair(pred_mask, gt_mask)
    if isinstance(dilation, bool) or int(dilation) != dilation or dilation < 0:
        raise ValueError(f"dilation must be a non-negative integer, got {dilation!r}")
    if not threshold_mm3 >= 0:
        raise ValueError(f"threshold_mm3 must be >= 0, got {threshold_mm3!r}")
    return _lesion_wise(p, g, _check_spacing(spacing), int(dilation), float(threshold_mm3))


def _lesion_scores(
    pred: np.ndarray, gt: np.ndarray, spacing: tuple[float, float, float], challenge: str
) -> dict[str, LesionWiseScore]:
    params = LESION_PARAMS[resolve_challenge(challenge)]
    return {
        region: _lesion_wise(
            np.asarray(region_masks(pred, region)),
            np.asarray(region_masks(gt, region)),
            spacing,
            params.dilation,
            params.threshold_mm3,
        )
        for region in REGIONS
    }


def lesion_wise(
    pred: Any,
    gt: Any,
    spacing: Sequence[float] | float = (1.0, 1.0, 1.0),
    challenge: str = "GLI",
) -> dict[str, LesionWiseScore]:
    """BraTS 2023 lesion-wise scores of each region WT, TC, ET between two label maps.

    ``challenge`` (GLI, SSA, PED, MEN, MET; ``"BraTS-GLI"`` and lower case accepted) selects the
    dilation and volume threshold from :data:`LESION_PARAMS`.
    """
    p, g = _check_label_pair(pred, gt)
    resolve_challenge(challenge)  # fail before any work
    return _lesion_scores(p, g, _check_spacing(spacing), challenge)


def evaluate_case(
    pred: Any,
    gt: Any,
    spacing: Sequence[float] | float = (1.0, 1.0, 1.0),
    challenge: str = "GLI",
) -> dict[str, dict[str, float | int]]:
    """Region-level and lesion-wise scores of one case, flat and JSON-serialisable.

    Returns ``{region: {"dice", "hd95", "lesion_dice", "lesion_hd95", "tp", "fn", "fp"}}`` for the
    regions WT, TC, ET (see :func:`region_dice_hd95` and :func:`lesion_wise`).
    """
    p, g = _check_label_pair(pred, gt)
    resolve_challenge(challenge)
    sp = _check_spacing(spacing)
    regions = _region_scores(p, g, sp)
    lesions = _lesion_scores(p, g, sp, challenge)
    return {
        r: {
            "dice": float(regions[r].dice),
            "hd95": float(regions[r].hd95),
            "lesion_dice": float(lesions[r].dice),
            "lesion_hd95": float(lesions[r].hd95),
            "tp": int(lesions[r].tp),
            "fn": int(lesions[r].fn),
            "fp": int(lesions[r].fp),
        }
        for r in REGIONS
    }
