"""Infiltration risk zones: distance-transform zones around the predicted whole tumour, in mm
on the grid's own spacing, inside the brain; and ``fedbrats predict --infiltration-zones``."""

from __future__ import annotations

import numpy as np
import pytest
from test_predict import assert_same_grid, sphere_case, student, student_file, write_case  # noqa: F401

from fedbrats.common.cli import main
from fedbrats.common.data.cases import discover_cases
from fedbrats.common.inference.infiltration import (
    ZONE_NAMES,
    brain_of,
    infiltration_zones,
    parse_zone_edges,
    zone_volumes,
)
from fedbrats.common.inference.predict import output_paths, predict_case

SPACING = (1.0, 1.0, 3.0)  # anisotropic: thick slices along the last axis


def _tumour(shape=(30, 30, 12)):
    """A box of oedema (SNFH, 2) around a core (NETC 1, ET 3), off centre."""
    labels = np.zeros(shape, np.uint8)
    labels[8:20, 9:19, 4:8] = 2
    labels[11:17, 12:16, 5:7] = 1
    labels[12:15, 13:15, 5:7] = 3
    return labels


def _brute_distance(mask: np.ndarray, spacing, to: np.ndarray) -> np.ndarray:
    """For every voxel, the Euclidean distance in mm to the nearest voxel of ``to``."""
    pts = np.argwhere(np.ones(mask.shape, bool)) * np.asarray(spacing)
    targets = np.argwhere(to) * np.asarray(spacing)
    d = np.sqrt(((pts[:, None, :] - targets[None, :, :]) ** 2).sum(-1)).min(1)
    return d.reshape(mask.shape)


def test_zones_follow_the_distances_in_mm_of_an_anisotropic_grid():
    labels = _tumour()
    brain = np.ones(labels.shape, bool)
    zones = infiltration_zones(labels, brain, SPACING, (2.0, 6.0, 12.0))
    wt = labels > 0
    outside = _brute_distance(wt, SPACING, wt)
    inside = _brute_distance(wt, SPACING, ~wt)
    expected = np.zeros_like(zones)
    expected[(labels == 2) & (inside <= 2.0)] = 1
    expected[~wt & (outside <= 6.0)] = 2
    expected[~wt & (outside > 6.0) & (outside <= 12.0)] = 3
    np.testing.assert_array_equal(zones, expected)
    # the edges follow the spacing: a 6 mm margin is 6 voxels in-plane and 2 across slices
    # (centre to centre: the tumour's outermost layer is one voxel, 3 mm here, from outside,
    # so a 2 mm front has no voxel across slices)
    column = zones[14, 14, :]  # through the tumour along the thick-slice axis
    assert list(column[8:12]) == [2, 2, 3, 3] and column[7] == 0
    row = zones[:, 14, 6]
    assert list(row[2:8]) == [2] * 6 and row[1] == 3 and row[8] == 1
    # the core is never a zone; zone 1 is oedema only
    assert not zones[labels == 1].any() and not zones[labels == 3].any()
    assert set(np.unique(labels[zones == 1])) == {2}


def test_zones_stay_in_the_brain_and_an_empty_tumour_has_none():
    labels = _tumour()
    brain = np.ones(labels.shape, bool)
    brain[:, :, :3] = False  # the slices below are not brain
    zones = infiltration_zones(labels, brain, SPACING, (2.0, 6.0, 12.0))
    assert not zones[:, :, :3].any()
    assert zones[:, :, 3:].any()
    assert not infiltration_zones(np.zeros_like(labels), brain, SPACING, (2, 6, 12)).any()
    with pytest.raises(ValueError, match="differ in shape"):
        infiltration_zones(labels, brain[:-1], SPACING, (2, 6, 12))


def test_a_deep_inner_edge_takes_all_of_the_oedema_and_volumes_are_in_mm3():
    labels = _tumour()
    zones = infiltration_zones(labels, np.ones(labels.shape, bool), SPACING, (100, 6, 12))
    np.testing.assert_array_equal(zones == 1, labels == 2)
    vol = zone_volumes(zones, SPACING)
    assert list(vol) == list(ZONE_NAMES)
    assert vol["oedema front"] == pytest.approx((labels == 2).sum() * 3.0)
    assert vol["first margin"] == pytest.approx((zones == 2).sum() * 3.0)


def test_brain_of_fills_holes():
    image = np.zeros((4, 9, 9, 9), np.float32)
    image[:, 1:8, 1:8, 1:8] = 1.0
    image[:, 4, 4, 4] = 0.0  # a dark voxel inside the brain
    brain = brain_of(image)
    assert brain[4, 4, 4] and brain.sum() == 7**3


@pytest.mark.parametrize("text,message", [
    ("5,10", "expected INNER,FIRST,SECOND"), ("5,x,20", "expected INNER,FIRST,SECOND"),
    ("5,-1,20", "three positive distances"), ("5,20,10", "must lie beyond the first's"),
])
def test_bad_zone_edges_say_what_was_expected(text, message):
    with pytest.raises(ValueError, match=message):
        parse_zone_edges(text)
    assert parse_zone_edges(" 5, 10 ,20") == (5.0, 10.0, 20.0)


def test_predict_writes_the_zones_on_the_input_grid(tmp_path, student, student_file, capsys):
    images, _ = sphere_case((32, 32, 12), (1.5, 1.5, 4.0))
    affine = np.diag([1.5, 1.5, 4.0, 1.0])
    case_dir = write_case(tmp_path / "in", "BraTS-GLI-00001-000", images, affine)
    out = tmp_path / "out"
    rc = main(["predict", "--model", str(student_file), "--input", str(case_dir), "--out",
               str(out), "--no-postprocess", "--infiltration-zones", "3,6,12", "--device", "cpu",
               "--no-progress"])
    stdout = capsys.readouterr().out
    assert rc == 0, stdout
    import nibabel as nib

    paths = output_paths("BraTS-GLI-00001-000", out)
    assert_same_grid(paths["zones"], case_dir / "BraTS-GLI-00001-000-t1n.nii.gz")
    zones = np.asarray(nib.load(paths["zones"]).dataobj)
    seg = np.asarray(nib.load(paths["seg"]).dataobj)
    assert zones.dtype == np.uint8
    raw = np.stack([images[k] for k in ("t1n", "t1c", "t2w", "t2f")]).astype(np.float32)
    expected = infiltration_zones(seg, brain_of(raw), (1.5, 1.5, 4.0), (3, 6, 12))
    np.testing.assert_array_equal(zones, expected)
    assert (zones == 1).any() and (zones == 2).any()  # this student draws a partial tumour
    result = predict_case(student, discover_cases(case_dir)[0], apply_postprocess=False,
                          zone_edges=(3, 6, 12))
    ml = result.zone_volumes_mm3["first margin"] / 1000
    assert "infiltration zones (ml)" in stdout and f"{ml:.1f}" in stdout

    rc = main(["predict", "--model", str(student_file), "--input", str(case_dir), "--out",
               str(out), "--infiltration-zones", "3,6", "--device", "cpu", "--no-progress"])
    assert rc == 2
    assert "--infiltration-zones '3,6': expected INNER,FIRST,SECOND" in capsys.readouterr().err
