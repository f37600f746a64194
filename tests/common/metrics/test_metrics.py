"""Tests of fedbrats.common.metrics.brats on hand-built masks whose answers are worked out in the
comments.

Conventions used below: arrays are indexed [x, y, z]; a "cube at a:b" is the voxels a..b-1 on every
axis; HD95 374 is BraTS's value for "nothing to measure against".
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from monai.metrics import compute_hausdorff_distance
from scipy import ndimage

from fedbrats.common.data.contract import POPULATIONS
from fedbrats.common.metrics.brats import (
    HD95_MAX_MM,
    LESION_PARAMS,
    LesionParams,
    LesionWiseScore,
    RegionScore,
    evaluate_case,
    lesion_wise,
    lesion_wise_mask,
    region_dice_hd95,
    resolve_challenge,
)

SHAPE = (32, 32, 32)


def box(shape=SHAPE, *slices_and_label):
    """Label map with boxes painted in order: box(shape, (sx, sy, sz, label), ...)."""
    a = np.zeros(shape, dtype=np.uint8)
    for sx, sy, sz, label in slices_and_label:
        a[sx, sy, sz] = label
    return a


def cube(lo, hi, label=1, shape=SHAPE):
    return box(shape, (slice(lo, hi), slice(lo, hi), slice(lo, hi), label))


def mask(*slices_list, shape=SHAPE):
    m = np.zeros(shape, dtype=bool)
    for sl in slices_list:
        m[sl] = True
    return m


S = np.s_  # shorthand for slices


# ---------------------------------------------------------------------------------------------
# Region-level Dice and HD95
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("axis", "spacing"),
    [
        (0, (1.0, 1.0, 1.0)),
        (0, (1.5, 1.5, 1.5)),
        (1, (1.0, 1.5, 1.0)),
        (2, (1.0, 1.0, 2.5)),
        (2, (0.5, 0.5, 2.5)),
    ],
)
def test_shifted_cube_dice_and_hd95(axis, spacing):
    # GT: cube 10..15 (side 6, 216 voxels). Pred: the same cube shifted by +2 voxels along `axis`.
    # Overlap: 4 layers of 36 = 144 voxels -> Dice = 2*144 / (216+216) = 2/3.
    # Surface voxels of either cube: 216 - 4^3 = 152. Their distance to the other cube's surface,
    # in voxels along `axis`: the trailing face (36 voxels) is 2 away, 4 centre voxels of the
    # leading face are 2 away (fewer mm if the other axes are finer), the ring of the next layer
    # (20) is 1 away, the rest (80 + 12 at most 1 away) 0 or 1. The top 36 of 152 sorted distances
    # are 2 * spacing[axis], and the 95th percentile (position 143.45 of 0..151) falls among them:
    # HD95 = 2 * spacing[axis] mm (both directions are mirror images).
    gt = cube(10, 16)
    pred = np.roll(gt, 2, axis=axis)
    scores = region_dice_hd95(pred, gt, spacing)
    for region, expected in (("WT", True), ("TC", True), ("ET", False)):
        s = scores[region]
        if expected:  # label 1 is in WT and TC
            assert s.dice == pytest.approx(2 / 3, abs=1e-6)
            assert s.hd95 == pytest.approx(2 * spacing[axis], abs=1e-5)
        else:  # no label 3 anywhere: both empty
            assert (s.dice, s.hd95) == (1.0, 0.0)


@pytest.mark.parametrize(
    ("pred_label", "gt_label", "expected"),
    [
        # both empty in every region -> Dice 1, HD95 0
        (None, None, {"WT": (1, 0), "TC": (1, 0), "ET": (1, 0)}),
        # GT empty, prediction not -> Dice 0, HD95 374 where the prediction's label counts
        (2, None, {"WT": (0, 374), "TC": (1, 0), "ET": (1, 0)}),
        # prediction empty, GT not
        (None, 1, {"WT": (0, 374), "TC": (0, 374), "ET": (1, 0)}),
        # nesting: label 3 counts in WT, TC and ET
        (3, 3, {"WT": (1, 0), "TC": (1, 0), "ET": (1, 0)}),
        # predicted SNFH (2) on a GT ET (3): right WT, TC and ET both missed
        (2, 3, {"WT": (1, 0), "TC": (0, 374), "ET": (0, 374)}),
        # predicted NETC (1) on a GT ET (3): right WT and TC, ET missed
        (1, 3, {"WT": (1, 0), "TC": (1, 0), "ET": (0, 374)}),
        # predicted ET on GT NETC: WT, TC right; ET predicted where the GT has none
        (3, 1, {"WT": (1, 0), "TC": (1, 0), "ET": (0, 374)}),
    ],
)
def test_region_empty_conventions_and_nesting(pred_label, gt_label, expected):
    def paint(label):
        return np.zeros(SHAPE, np.uint8) if label is None else cube(12, 17, label)

    scores = region_dice_hd95(paint(pred_label), paint(gt_label), (1, 1, 1))
    got = {r: (s.dice, s.hd95) for r, s in scores.items()}
    assert got == {r: (pytest.approx(d), pytest.approx(h)) for r, (d, h) in expected.items()}


def test_single_voxel_label_3_counts_in_every_region():
    # One voxel of label 3 in GT and prediction: it is WT, TC and ET at once -> Dice 1 everywhere.
    gt = np.zeros(SHAPE, np.uint8)
    gt[5, 5, 5] = 3
    scores = region_dice_hd95(gt.copy(), gt, 1.0)
    assert all(s.dice == 1.0 and s.hd95 == 0.0 for s in scores.values())
    lw = lesion_wise(gt.copy(), gt, challenge="MET")  # 1 mm^3 <= 2: dropped, nothing else
    assert all((s.dice, s.hd95, s.tp, s.fn, s.fp) == (1.0, 0.0, 0, 0, 0) for s in lw.values())


@pytest.mark.filterwarnings("ignore::FutureWarning")  # MONAI's own deprecated-argument warning
def test_cropping_matches_monai_on_full_arrays():
    # The helper crops to the union's bounding box; MONAI on the full arrays must agree, including
    # for a mask touching the array border (where a crop could change the edges if done wrong).
    rng = np.random.default_rng(3)
    gt = ndimage.binary_dilation(rng.random(SHAPE) > 0.995, iterations=2)
    gt[0:4, 0:6, 10:14] = True  # touches the border
    pred = np.roll(gt, 1, axis=1)
    pred[20:25, 28:32, 28:32] = True  # extra blob at a corner
    spacing = (1.0, 1.5, 2.0)
    ours = region_dice_hd95(pred.astype(np.uint8), gt.astype(np.uint8), spacing)["WT"]
    t = lambda m: torch.from_numpy(m)[None, None]  # noqa: E731
    ref = compute_hausdorff_distance(
        t(pred), t(gt), include_background=True, percentile=95, spacing=list(spacing)
    ).item()
    ref_dice = 2 * np.count_nonzero(pred & gt) / (pred.sum() + gt.sum())
    assert ours.hd95 == pytest.approx(ref, abs=1e-5)
    assert ours.dice == pytest.approx(ref_dice, abs=1e-6)


# ---------------------------------------------------------------------------------------------
# Lesion-wise: hand-built cases
# ---------------------------------------------------------------------------------------------

A = S[2:8, 2:8, 2:8]  # 216 voxels
B = S[20:26, 20:26, 20:26]  # 216 voxels, far from A
FP_BLOB = S[2:6, 24:28, 24:28]  # 64 voxels, far from A and B


@pytest.mark.parametrize(
    ("gt_boxes", "pred_boxes", "dice", "hd95", "tp", "fn", "fp"),
    [
        # two GT cubes far apart, prediction = A exactly: lesions (1, 0) -> Dice (1+0)/2 = 0.5,
        # HD95 (0+374)/2 = 187; A is a TP, B a FN
        ([A, B], [A], 0.5, 187.0, 1, 1, 0),
        # both found exactly
        ([A, B], [A, B], 1.0, 0.0, 2, 0, 0),
        # one GT lesion found + one false-positive blob: Dice (1+0)/(1+1) = 0.5,
        # HD95 (0 + 374)/2 = 187
        ([A], [A, FP_BLOB], 0.5, 187.0, 1, 0, 1),
        # the first case plus a false positive: Dice (1+0)/(2+1) = 1/3, HD95 (0+374+374)/3
        ([A, B], [A, FP_BLOB], 1 / 3, 2 * 374 / 3, 1, 1, 1),
        # nothing predicted: Dice 0, HD95 374
        ([A, B], [], 0.0, 374.0, 0, 2, 0),
        # both empty -> Dice 1, HD95 0
        ([], [], 1.0, 0.0, 0, 0, 0),
        # GT empty, prediction not -> 0/(0+1) = 0, HD95 374*1/1 = 374
        ([], [FP_BLOB], 0.0, 374.0, 0, 0, 1),
        ([], [A, B], 0.0, 374.0, 0, 0, 2),
    ],
)
def test_lesion_wise_table(gt_boxes, pred_boxes, dice, hd95, tp, fn, fp):
    s = lesion_wise_mask(
        mask(*pred_boxes), mask(*gt_boxes), (1, 1, 1), dilation=3, threshold_mm3=50
    )
    assert s.dice == pytest.approx(dice)
    assert s.hd95 == pytest.approx(hd95)
    assert (s.tp, s.fn, s.fp) == (tp, fn, fp)


def test_lesion_details():
    # GT A and B, prediction A exactly: details in raster order (A first), 216 voxels x 8 mm^3.
    s = lesion_wise_mask(mask(A), mask(A, B), (2, 2, 2), dilation=3, threshold_mm3=50)
    assert [d.to_dict() for d in s.lesions] == [
        {"volume_mm3": 1728.0, "dice": 1.0, "hd95": 0.0, "n_pred": 1, "kept": True},
        {"volume_mm3": 1728.0, "dice": 0.0, "hd95": 374.0, "n_pred": 0, "kept": True},
    ]


# Two 5x5x5 cubes (125 voxels each) along x, with a 4-voxel gap between them (x = 10..13 empty).
# Dilation k grows each cube by k voxels towards the other: k = 1 -> x 10 and 13 filled, 11 and 12
# still empty (separate); k = 3 -> x 10..12 and 11..13 filled (the dilated regions overlap: merged).
NEAR_1 = S[5:10, 5:10, 5:10]
NEAR_2 = S[14:19, 5:10, 5:10]


@pytest.mark.parametrize(
    ("challenge", "n_lesions", "dice", "tp", "fn"),
    [
        # GLI, dilation 3: one lesion of 250 voxels; prediction = first cube (125, all inside):
        # Dice 2*125/(125+250) = 2/3; found -> tp 1
        ("GLI", 1, 2 / 3, 1, 0),
        ("SSA", 1, 2 / 3, 1, 0),
        ("PED", 1, 2 / 3, 1, 0),
        # MEN, dilation 1: two lesions, first exact (1), second missed (0) -> (1+0)/2
        ("MEN", 2, 0.5, 1, 1),
        ("MET", 2, 0.5, 1, 1),
    ],
)
def test_dilation_merges_nearby_lesions(challenge, n_lesions, dice, tp, fn):
    gt = box(SHAPE, (*NEAR_1, 1), (*NEAR_2, 1))
    pred = box(SHAPE, (*NEAR_1, 1))
    wt = lesion_wise(pred, gt, (1, 1, 1), challenge)["WT"]
    assert len(wt.lesions) == n_lesions
    assert wt.dice == pytest.approx(dice)
    assert (wt.tp, wt.fn, wt.fp) == (tp, fn, 0)
    if n_lesions == 2:
        assert wt.hd95 == pytest.approx((0 + 374) / 2)


def test_dilation_uses_official_18_neighbourhood():
    # Two 5^3 cubes meeting only corner to corner: A ends at (9, 9, 9), B starts at (12, 12, 12).
    # One dilation with the official 18-neighbourhood (no corner step) reaches (10, 10, 9) etc.
    # but never (10, 10, 10) from A nor (11, 11, 11) from B, so no two dilated voxels are
    # 26-adjacent: 2 lesions. (With the full 26-neighbourhood, (10,10,10) and (11,11,11) would be
    # added and the lesions would merge into 1.)
    gt = mask(S[5:10, 5:10, 5:10], S[12:17, 12:17, 12:17])
    s = lesion_wise_mask(np.zeros_like(gt), gt, 1, dilation=1, threshold_mm3=50)
    assert len(s.lesions) == 2 and s.fn == 2
    full = ndimage.binary_dilation(gt, ndimage.generate_binary_structure(3, 3), iterations=1)
    assert ndimage.label(full, np.ones((3, 3, 3)))[1] == 1  # the 26-element would merge them


@pytest.mark.parametrize(
    ("dilation", "tp", "fn", "fp", "dice"),
    [
        # A 2-voxel-thick slab 2 voxels away from the GT cube (gap at x = 8, 9): no overlap.
        # Dilation 3 reaches it: it is the lesion's match (tp, not fp), Dice 0 (no overlap).
        (3, 1, 0, 0, 0.0),
        # Dilation 1 does not reach it: the lesion is missed (fn) and the slab is a fp:
        # Dice (0 + 0)/(1 + 1) = 0, HD95 (374 + 374)/2 = 374.
        (1, 0, 1, 1, 0.0),
    ],
)
def test_match_is_by_dilated_region_not_overlap(dilation, tp, fn, fp, dice):
    gt = mask(A)  # x 2..7
    pred = mask(S[10:12, 2:8, 2:8])
    s = lesion_wise_mask(pred, gt, 1, dilation=dilation, threshold_mm3=50)
    assert (s.tp, s.fn, s.fp) == (tp, fn, fp)
    assert s.dice == pytest.approx(dice)
    if dilation == 3:
        # GT surface (152 voxels) to the slab: the far face x = 2 (36 voxels) is 8 away (to
        # x = 10), the rest 3..7; these 36 are the top of the sorted list, and the 95th percentile
        # (position 143.45 of 0..151) falls among them. Slab -> GT is at most 4 (x = 11 -> 7).
        # HD95 = max(8, <= 4) = 8 mm.
        assert s.hd95 == pytest.approx(8.0)
    else:
        assert s.hd95 == pytest.approx(374.0)


def test_prediction_spanning_two_lesions_matches_both():
    # MEN (dilation 1): NEAR_1 and NEAR_2 are two lesions. A bar x 5..18 covering both (and the
    # gap; 14*5*5 = 350 voxels) matches both: each lesion's Dice = 2*125/(125+350) = 250/475.
    gt = mask(NEAR_1, NEAR_2)
    pred = mask(S[5:19, 5:10, 5:10])
    s = lesion_wise_mask(pred, gt, 1, dilation=1, threshold_mm3=50)
    assert (s.tp, s.fn, s.fp) == (2, 0, 0)
    assert s.dice == pytest.approx(250 / 475)


# Volume threshold (official: lesions with volume <= threshold are left out), volume = voxels x
# voxel volume. Prediction is empty, so a kept lesion scores (Dice 0, HD95 374, fn 1) and a
# dropped one leaves nothing to average: 0/0 -> Dice 1, HD95 0 as in the official code.
@pytest.mark.parametrize(
    ("n_voxels", "spacing", "threshold", "kept"),
    [
        (50, (1, 1, 1), 50, False),  # 50 mm^3: at the threshold -> dropped
        (51, (1, 1, 1), 50, True),  # 51 mm^3 -> kept
        (6, (2, 2, 2), 50, False),  # 6 x 8 = 48 mm^3 -> dropped
        (7, (2, 2, 2), 50, True),  # 7 x 8 = 56 mm^3 -> kept
        (7, (1, 1, 1), 50, False),  # the same 7 voxels at 1 mm: 7 mm^3 -> dropped
        (13, (1, 1, 4), 50, True),  # 13 x 4 = 52 mm^3 -> kept
        (2, (1, 1, 1), 2, False),  # MET threshold 2: 2 mm^3 dropped
        (3, (1, 1, 1), 2, True),  # 3 mm^3 kept
    ],
)
def test_volume_threshold_in_mm3(n_voxels, spacing, threshold, kept):
    # the first n voxels, in raster order, of a 4x4x4 block: whole layers, whole rows, then a
    # partial row, each touching the previous -> one connected lesion
    block = np.zeros((4, 4, 4), bool)
    block.reshape(-1)[:n_voxels] = True
    gt = np.zeros(SHAPE, bool)
    gt[10:14, 10:14, 10:14] = block
    assert ndimage.label(gt, np.ones((3, 3, 3)))[1] == 1
    s = lesion_wise_mask(np.zeros_like(gt), gt, spacing, dilation=1, threshold_mm3=threshold)
    assert s.lesions[0].volume_mm3 == pytest.approx(n_voxels * np.prod(spacing))
    assert s.lesions[0].kept is kept
    if kept:
        assert (s.dice, s.hd95, s.tp, s.fn, s.fp) == (0.0, 374.0, 0, 1, 0)
    else:
        assert (s.dice, s.hd95, s.tp, s.fn, s.fp) == (1.0, 0.0, 0, 0, 0)


@pytest.mark.parametrize(
    ("spacing", "dice", "hd95", "tp", "fn"),
    [
        # big cube A (216 voxels) missed; small cube (3^3 = 27 voxels) predicted exactly.
        # 1 mm: small = 27 mm^3 <= 50 -> dropped; its prediction is not a fp (official: a
        # component matched by a dropped lesion is ignored). Only A: Dice 0, HD95 374.
        ((1, 1, 1), 0.0, 374.0, 0, 1),
        # 2 mm: small = 216 mm^3 -> kept: Dice (0+1)/2 = 0.5, HD95 (374+0)/2 = 187.
        ((2, 2, 2), 0.5, 187.0, 1, 1),
    ],
)
def test_small_lesion_depends_on_spacing(spacing, dice, hd95, tp, fn):
    small = S[20:23, 20:23, 20:23]
    gt = box(SHAPE, (*A, 2), (*small, 2))
    pred = box(SHAPE, (*small, 2))
    wt = lesion_wise(pred, gt, spacing, "GLI")["WT"]
    assert (wt.dice, wt.hd95) == (pytest.approx(dice), pytest.approx(hd95))
    assert (wt.tp, wt.fn, wt.fp) == (tp, fn, 0)


def test_lesion_wise_regions_are_nested():
    # GT: cube of SNFH (2) with an ET (3) core; prediction = GT exactly, plus a lone ET blob far
    # away. WT/TC/ET all see the blob (label 3 is in every region) as one false positive.
    # WT: lesion 1 exact + fp -> (1+0)/2; TC: {1,3} = ET core exact + fp -> 0.5; ET likewise.
    gt = box(SHAPE, (*S[4:14, 4:14, 4:14], 2), (*S[6:12, 6:12, 6:12], 3))
    pred = gt.copy()
    pred[FP_BLOB] = 3
    lw = lesion_wise(pred, gt, challenge="GLI")
    for region in ("WT", "TC", "ET"):
        assert (lw[region].dice, lw[region].fp, lw[region].tp) == (0.5, 1, 1)
        assert lw[region].hd95 == pytest.approx(187.0)


# ---------------------------------------------------------------------------------------------
# Lesion-wise against a plain, unoptimised re-statement of the definition
# ---------------------------------------------------------------------------------------------


def _reference_lesion_wise(pred, gt, voxel, dilation, threshold):
    """Straight from the definition, on full arrays, dilating each lesion again (no cropping)."""
    st18 = ndimage.generate_binary_structure(3, 2)
    st26 = np.ones((3, 3, 3), bool)
    pred_cc, n_pred = ndimage.label(pred, st26)
    dil = ndimage.binary_dilation(gt, st18, iterations=dilation)
    dil_cc, n = ndimage.label(dil, st26)
    matched_all, kept = set(), []
    for i in range(1, n + 1):
        lesion = gt & (dil_cc == i)
        region = ndimage.binary_dilation(lesion, st18, iterations=dilation)
        matched = set(np.unique(pred_cc[region]).tolist()) - {0}
        matched_all |= matched
        p = np.isin(pred_cc, list(matched))
        d = 2 * np.count_nonzero(p & lesion) / (p.sum() + lesion.sum())
        h = 374.0
        if matched:
            t = lambda m: torch.from_numpy(m)[None, None]  # noqa: E731
            h = compute_hausdorff_distance(
                t(p), t(lesion), include_background=True, percentile=95
            ).item()
        if lesion.sum() * voxel > threshold:
            kept.append((d, h, bool(matched)))
    n_fp = n_pred - len(matched_all)
    denom = len(kept) + n_fp
    if denom == 0:
        return 1.0, 0.0, 0, 0, 0
    dice = sum(k[0] for k in kept) / denom
    hd95 = (sum(k[1] for k in kept) + 374.0 * n_fp) / denom
    tp = sum(k[2] for k in kept)
    return dice, hd95, tp, len(kept) - tp, n_fp


@pytest.mark.filterwarnings("ignore::FutureWarning")  # MONAI's own deprecated-argument warning
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("dilation", [1, 3])
def test_lesion_wise_matches_plain_definition(seed, dilation):
    # Random blobs: ~20 GT components that merge into 1..8 lesions, some under the threshold,
    # a prediction that misses the x < 8 part (fn), is thinned and shifted, plus random specks (fp).
    rng = np.random.default_rng(seed)
    shape = (24, 24, 20)
    seeds = rng.random(shape) > 0.997
    st18 = ndimage.generate_binary_structure(3, 2)
    gt = ndimage.binary_dilation(seeds) | ndimage.binary_dilation(
        seeds & (rng.random(shape) > 0.5), st18, iterations=2
    )
    pred = ndimage.binary_dilation(np.roll(gt, 1, axis=0) & (rng.random(shape) > 0.4))
    pred[:8] = False
    pred |= ndimage.binary_dilation(rng.random(shape) > 0.9985)
    s = lesion_wise_mask(pred, gt, (1, 1, 1), dilation=dilation, threshold_mm3=20)
    dice, hd95, tp, fn, fp = _reference_lesion_wise(pred, gt, 1.0, dilation, 20)
    assert s.dice == pytest.approx(dice)
    assert s.hd95 == pytest.approx(hd95, abs=1e-4)
    assert (s.tp, s.fn, s.fp) == (tp, fn, fp)


# ---------------------------------------------------------------------------------------------
# Parameters, API, validation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("challenge", "dilation", "threshold"),
    [("GLI", 3, 50), ("SSA", 3, 50), ("PED", 3, 50), ("MEN", 1, 50), ("MET", 1, 2)],
)
def test_lesion_params_match_official_table(challenge, dilation, threshold):
    assert LESION_PARAMS[challenge] == LesionParams(dilation, threshold)
    assert LESION_PARAMS[challenge].to_dict() == {"dilation": dilation, "threshold_mm3": threshold}


def test_lesion_params_cover_all_populations():
    assert tuple(LESION_PARAMS) == POPULATIONS


@pytest.mark.parametrize(
    ("name", "code"), [("GLI", "GLI"), ("met", "MET"), (" BraTS-MEN ", "MEN"), ("brats-ped", "PED")]
)
def test_resolve_challenge(name, code):
    assert resolve_challenge(name) == code


@pytest.mark.parametrize(("typo", "suggestion"), [("GLO", "GLI"), ("MNE", "MEN"), ("MTE", "MET")])
def test_unknown_challenge_suggests_nearest(typo, suggestion):
    gt = np.zeros((4, 4, 4), np.uint8)
    with pytest.raises(ValueError, match=f"did you mean '{suggestion}'"):
        lesion_wise(gt, gt, challenge=typo)


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(4, 4, 4\).*\(4, 4, 5\)"):
        evaluate_case(np.zeros((4, 4, 4), np.uint8), np.zeros((4, 4, 5), np.uint8))
    with pytest.raises(ValueError, match=r"\(4, 4, 4\).*\(4, 5, 4\)"):
        lesion_wise_mask(np.zeros((4, 4, 4), bool), np.zeros((4, 5, 4), bool))


@pytest.mark.parametrize(
    "bad",
    [
        np.full((4, 4, 4), 4, np.uint8),  # label 4 (BraTS 2021 ET convention) is not internal
        np.full((4, 4, 4), -1, np.int16),
        np.full((4, 4, 4), 1.5, np.float32),
    ],
)
def test_bad_label_values(bad):
    good = np.zeros((4, 4, 4), np.uint8)
    with pytest.raises(ValueError, match="outside"):
        region_dice_hd95(bad, good)
    with pytest.raises(ValueError, match="outside"):
        lesion_wise(good, bad)


def test_bad_spacing_and_dilation():
    m = np.zeros((4, 4, 4), bool)
    with pytest.raises(ValueError, match="spacing"):
        lesion_wise_mask(m, m, (1, 1))
    with pytest.raises(ValueError, match="spacing"):
        lesion_wise_mask(m, m, (1, 0, 1))
    with pytest.raises(ValueError, match="dilation"):
        lesion_wise_mask(m, m, 1, dilation=-1)


def test_evaluate_case_flat_and_json():
    gt = box(SHAPE, (*A, 2), (*S[3:7, 3:7, 3:7], 3), (*B, 1))
    pred = box(SHAPE, (*A, 2), (*S[3:7, 3:7, 3:7], 3))
    out = evaluate_case(pred, torch.from_numpy(gt), (1, 1, 1), "BraTS-GLI")
    assert list(out) == ["WT", "TC", "ET"]
    keys = ["dice", "hd95", "lesion_dice", "lesion_hd95", "tp", "fn", "fp"]
    assert all(list(v) == keys for v in out.values())
    assert json.loads(json.dumps(out)) == out
    # ET: exact -> 1, 0 at both levels
    assert out["ET"] == {k: v for k, v in zip(keys, [1.0, 0.0, 1.0, 0.0, 1, 0, 0], strict=True)}
    # TC = {1, 3}: GT = core (64) + B (216); pred = core. Region Dice 2*64/(64+280) = 128/344.
    # Lesions: core exact (1), B missed (0) -> 0.5, HD95 187.
    assert out["TC"]["dice"] == pytest.approx(128 / 344, abs=1e-6)
    assert (out["TC"]["lesion_dice"], out["TC"]["lesion_hd95"]) == (0.5, 187.0)
    assert (out["TC"]["tp"], out["TC"]["fn"], out["TC"]["fp"]) == (1, 1, 0)


def test_dataclasses_frozen_and_to_dict():
    r = RegionScore(0.5, 3.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.dice = 1.0  # type: ignore[misc]
    assert r.to_dict() == {"dice": 0.5, "hd95": 3.0}
    s = lesion_wise_mask(mask(A), mask(A, B), 1, dilation=3, threshold_mm3=50)
    assert isinstance(s, LesionWiseScore)
    d = s.to_dict()
    assert d["dice"] == 0.5 and d["hd95"] == 187.0 and len(d["lesions"]) == 2
    json.dumps(d)
    assert HD95_MAX_MM == 374.0
