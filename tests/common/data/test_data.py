"""Case discovery and the data-contract checks, on real NIfTI files written in tmp dirs."""

import gzip
import shutil

import numpy as np
import pytest
from conftest import make_volume, save_nifti

from fedbrats.common.data.cases import DataError, check_case, discover_cases, load_case
from fedbrats.common.data.verify import format_reports, verify_site

# --- discovery ----------------------------------------------------------------------------


def test_discovers_brats2023_layout(brats2023_site):
    cases = discover_cases(brats2023_site)
    assert [c.case_id for c in cases] == ["BraTS-GLI-00000-000", "BraTS-GLI-00001-000"]
    case = cases[0]
    assert case.population == "GLI"
    assert case.missing == ()
    assert case.images["t2f"].name == "BraTS-GLI-00000-000-t2f.nii.gz"
    assert case.seg.name == "BraTS-GLI-00000-000-seg.nii.gz"


@pytest.mark.parametrize("flat", [False, True])
def test_discovers_brats2021_layout(tmp_path, flat):
    images, seg = make_volume(labels=(1, 2, 3))
    seg = np.where(seg == 3, 4, seg).astype(np.uint8)  # 2021 convention: ET is 4
    names = {"t1n": "t1", "t1c": "t1ce", "t2w": "t2", "t2f": "flair"}
    for cid in ("BraTS2021_00000", "BraTS2021_00002"):
        folder = tmp_path if flat else tmp_path / cid
        for key, arr in images.items():
            save_nifti(folder / f"{cid}_{names[key]}.nii.gz", arr)
        save_nifti(folder / f"{cid}_seg.nii.gz", seg)
    cases = discover_cases(tmp_path)
    assert [c.case_id for c in cases] == ["BraTS2021_00000", "BraTS2021_00002"]
    assert cases[0].images["t1c"].name == "BraTS2021_00000_t1ce.nii.gz"
    assert cases[0].population is None
    loaded = load_case(cases[0], "brats2021")
    assert set(np.unique(loaded.seg)) == {0, 1, 2, 3}
    # the same files read as BraTS 2023 fail, and the error says which convention fits
    with pytest.raises(DataError, match="--labels brats2021"):
        load_case(cases[0], "brats2023")


def test_manifest_with_missing_contrast(tmp_path):
    images, seg = make_volume()
    for key, arr in images.items():
        save_nifti(tmp_path / "scans" / f"p1_{key}.nii", arr)
    save_nifti(tmp_path / "scans" / "p1_mask.nii", seg)
    manifest = tmp_path / "cases.csv"
    manifest.write_text(
        "case_id,t1n,t1c,t2w,t2f,seg,population\n"
        "p1,scans/p1_t1n.nii,scans/p1_t1c.nii,,scans/p1_t2f.nii,scans/p1_mask.nii,met\n"
    )
    (case,) = discover_cases(tmp_path, manifest=manifest)
    assert case.case_id == "p1" and case.population == "MET"
    assert case.missing == ("t2w",)
    assert discover_cases(manifest)[0] == case  # a .csv given as the site works too
    loaded = load_case(case)
    assert loaded.present == (True, True, False, True)
    assert not loaded.image[2].any()  # the missing contrast is a zero channel
    assert loaded.image[0].any()


@pytest.mark.parametrize(
    "text,match",
    [
        ("name,t1n\nx,a.nii\n", "expected a case id column"),
        ("case_id,seg\nx,a.nii\n", "at least one contrast column"),
        ("case_id,t1n,weight\nx,a.nii,3\n", r"unknown columns \['weight'\]"),
        ("case_id,t1n\nx,a.nii\nx,b.nii\n", "line 3: case id 'x' appears twice"),
        ("case_id,t1n,population\nx,a.nii,LGG\n", "population 'LGG'"),
        ("case_id,t1n\n", "lists no cases"),
    ],
)
def test_bad_manifests(tmp_path, text, match):
    manifest = tmp_path / "m.csv"
    manifest.write_text(text)
    with pytest.raises(DataError, match=match):
        discover_cases(tmp_path, manifest)


def test_missing_site_folder(tmp_path):
    with pytest.raises(DataError, match="site folder not found"):
        discover_cases(tmp_path / "nope")


def test_folder_without_cases_suggests_manifest(tmp_path):
    save_nifti(tmp_path / "scan.nii.gz", np.ones((4, 4, 4), np.int16))
    with pytest.raises(DataError, match=r"no cases found.*scan.nii.gz.*manifest"):
        discover_cases(tmp_path)


# --- checks: each bad input gives an error naming case, file, expected and found ------------


def _case(site):
    return discover_cases(site)[0]


def test_good_case_passes_and_loads(brats2023_site):
    case = _case(brats2023_site)
    report = check_case(case)
    assert report.ok, report.problems
    assert report.shape == (24, 20, 16)
    assert report.spacing == (1.0, 1.0, 1.0)
    assert report.label_values == (0, 1, 2, 3)
    loaded = load_case(case)
    assert loaded.image.shape == (4, 24, 20, 16) and loaded.image.dtype == np.float32
    assert loaded.seg.dtype == np.uint8


def _only_problem(case):
    report = check_case(case)
    assert len(report.problems) == 1, report.problems
    with pytest.raises(DataError) as e:
        load_case(case)
    assert str(e.value) == report.problems[0]
    return report.problems[0]


def test_truncated_file(brats2023_site):
    case = _case(brats2023_site)
    path = case.images["t1c"]
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw)[: len(raw) // 8])
    msg = _only_problem(case)
    assert "case BraTS-GLI-00000-000, t1c file" in msg and str(path) in msg
    assert "unreadable or truncated" in msg


def test_not_a_nifti(brats2023_site):
    case = _case(brats2023_site)
    case.images["t2w"].write_bytes(b"this is not an image")
    assert "t2w file" in _only_problem(case)


def test_not_3d(brats2023_site):
    case = _case(brats2023_site)
    save_nifti(case.images["t2w"], np.ones((24, 20, 16, 2), np.int16))
    msg = _only_problem(case)
    assert "expected a 3-D image, found shape (24, 20, 16, 2)" in msg


def test_shape_mismatch(brats2023_site):
    case = _case(brats2023_site)
    save_nifti(case.images["t2f"], np.ones((24, 20, 15), np.int16))
    msg = _only_problem(case)
    assert "t2f file" in msg and "shape (24, 20, 15) differs from t1n's (24, 20, 16)" in msg


def test_affine_mismatch(brats2023_site):
    case = _case(brats2023_site)
    affine = np.eye(4)
    affine[0, 3] = 2.5
    save_nifti(case.seg, np.zeros((24, 20, 16), np.uint8), affine)
    msg = _only_problem(case)
    assert "seg file" in msg and "affine differs from t1n's by up to 2.5 mm" in msg


def test_nan(brats2023_site):
    case = _case(brats2023_site)
    images, _ = make_volume()
    arr = images["t1n"].astype(np.float32)
    arr[3, 3, 3] = np.nan
    arr[4, 4, 4] = np.inf
    save_nifti(case.images["t1n"], arr)
    assert "t1n file" in (msg := _only_problem(case))
    assert "2 voxels are NaN or inf" in msg


def test_empty_image(brats2023_site):
    case = _case(brats2023_site)
    save_nifti(case.images["t1c"], np.zeros((24, 20, 16), np.int16))
    msg = _only_problem(case)
    assert "t1c file" in msg and "empty image (every voxel is 0" in msg


def test_unknown_labels(brats2023_site):
    case = _case(brats2023_site)
    _, seg = make_volume()
    seg[0, 0, 0] = 5
    save_nifti(case.seg, seg)
    msg = _only_problem(case)
    assert "seg file" in msg and "label values [5]" in msg and "{0, 1, 2, 3, 5}" in msg


def test_missing_file_from_manifest(tmp_path):
    (tmp_path / "m.csv").write_text("case_id,t1n\nx,gone.nii.gz\n")
    case = discover_cases(tmp_path / "m.csv")[0]
    assert "case x, t1n file" in (msg := _only_problem(case)) and "file not found" in msg


def test_require_seg(tmp_path, brats2023_site):
    case = _case(brats2023_site)
    case.seg.unlink()
    case = _case(brats2023_site)
    assert load_case(case).seg is None
    with pytest.raises(DataError, match="no segmentation file"):
        load_case(case, require_seg=True)


def test_all_problems_are_reported_not_just_the_first(brats2023_site):
    case = _case(brats2023_site)
    save_nifti(case.images["t1c"], np.zeros((24, 20, 16), np.int16))
    save_nifti(case.images["t2w"], np.ones((2, 2, 2), np.int16))
    assert len(check_case(case).problems) == 2


def test_verify_site_table_does_not_stop_at_first_bad_case(brats2023_site):
    first = _case(brats2023_site)
    save_nifti(first.images["t1c"], np.zeros((24, 20, 16), np.int16))
    reports = verify_site(brats2023_site)
    assert [r.ok for r in reports] == [False, True]
    table = format_reports(reports)
    assert "UNUSABLE" in table and "2 cases: 1 usable, 1 unusable" in table
    assert "24x20x16" in table and "t1n,t1c,t2w,t2f" in table


def test_unchanged_site_copy_is_identical(brats2023_site, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(brats2023_site, copy)
    a, b = load_case(_case(brats2023_site)), load_case(_case(copy))
    assert np.array_equal(a.image, b.image) and np.array_equal(a.seg, b.seg)


# --- the background outside the brain -----------------------------------------------------


def _prenormalised(images: dict, fill: float = -3.6) -> dict:
    """Each contrast z-scored over its brain, the background set to a constant, as public and
    in-house sets are often shipped (float32)."""
    out = {}
    for key, arr in images.items():
        a = arr.astype(np.float32)
        brain = a != 0
        z = (a - a[brain].mean()) / a[brain].std()
        out[key] = np.where(brain, z, np.float32(fill)).astype(np.float32)
    return out


def test_a_constant_background_of_a_prenormalised_case_is_the_background(tmp_path):
    from monai.transforms import Compose

    from fedbrats.common.data.transforms import IMAGE, LABEL, preprocessing

    images, seg = make_volume(shape=(40, 36, 30))
    shifted = _prenormalised(images)
    for name, imgs in (("raw", images), ("z", shifted)):
        for key, arr in imgs.items():
            save_nifti(tmp_path / name / "BraTS-GLI-00001-000" / f"BraTS-GLI-00001-000-{key}.nii.gz",
                       arr)
        save_nifti(tmp_path / name / "BraTS-GLI-00001-000" / "BraTS-GLI-00001-000-seg.nii.gz", seg)
    (raw_case,) = discover_cases(tmp_path / "raw")
    (z_case,) = discover_cases(tmp_path / "z")
    assert check_case(raw_case).background == "zero"
    report = check_case(z_case)
    assert report.ok and report.background == "constant -3.6" and not report.warnings
    loaded = load_case(z_case)
    brain = images["t1n"] != 0
    assert (loaded.image[:, ~brain] == 0).all() and (loaded.image[:, brain] != 0).any()
    # the crop to the brain and its z-score are those of the zero-background original
    steps = Compose(preprocessing(None))
    a, b = steps({"case": raw_case}), steps({"case": z_case})
    assert a[IMAGE].shape == b[IMAGE].shape and a[IMAGE].shape[1:] != (40, 36, 30)
    np.testing.assert_allclose(np.asarray(b[IMAGE]), np.asarray(a[IMAGE]), atol=1e-4)
    assert np.array_equal(np.asarray(a[LABEL]), np.asarray(b[LABEL]))
    table = format_reports(verify_site(tmp_path / "z"))
    assert "background" in table.splitlines()[0] and "constant -3.6" in table


def test_a_brain_mask_column_overrides_the_detection_and_no_background_warns(tmp_path):
    images, seg = make_volume(shape=(40, 36, 30))
    rng = np.random.default_rng(0)
    noisy = {k: (a + rng.normal(0, 5, a.shape)).astype(np.float32) for k, a in images.items()}
    brain = (images["t1n"] != 0).astype(np.uint8)
    for key, arr in noisy.items():
        save_nifti(tmp_path / "scans" / f"p1_{key}.nii.gz", arr)
    save_nifti(tmp_path / "scans" / "p1_seg.nii.gz", seg)
    save_nifti(tmp_path / "scans" / "p1_brain.nii.gz", brain)
    cells = ",".join(f"scans/p1_{k}.nii.gz" for k in ("t1n", "t1c", "t2w", "t2f"))
    (tmp_path / "plain.csv").write_text(f"case_id,t1n,t1c,t2w,t2f,seg\np1,{cells},scans/p1_seg.nii.gz\n")
    (tmp_path / "masked.csv").write_text("case_id,t1n,t1c,t2w,t2f,seg,brain_mask\n"
                                         f"p1,{cells},scans/p1_seg.nii.gz,scans/p1_brain.nii.gz\n")
    (plain,) = discover_cases(tmp_path / "plain.csv")
    report = check_case(plain)
    assert report.ok and report.background == "none found"
    (warning,) = report.warnings
    assert "p1" in warning and "no zero or constant background" in warning
    assert "brain_mask" in warning
    assert "ok, warning" in format_reports([report]) and "warnings:" in format_reports([report])
    (masked,) = discover_cases(tmp_path / "masked.csv")
    assert masked.brain_mask == tmp_path / "scans" / "p1_brain.nii.gz"
    report = check_case(masked)
    assert report.ok and report.background == "brain mask" and not report.warnings
    loaded = load_case(masked)
    assert (loaded.image[:, brain == 0] == 0).all()
    assert np.allclose(loaded.image[0][brain == 1], noisy["t1n"][brain == 1])
    # a mask on another grid is named as such
    save_nifti(tmp_path / "scans" / "p1_brain.nii.gz", brain[:-1])
    report = check_case(masked)
    assert not report.ok and any("brain_mask file" in p and "shape" in p for p in report.problems)
