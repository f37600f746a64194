"""fedbrats predict: segmentations on the input's own grid (shape, affine, header), for LPS and
anisotropic inputs, BraTS 2021 names, missing contrasts; post-processing in mm^3; clear errors."""

from __future__ import annotations

import dataclasses
import math

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import save_nifti
from torch import nn

import fedbrats.common.data.cases as cases_module
from fedbrats.common.cli import main
from fedbrats.common.config import PRESETS
from fedbrats.common.data.cases import DataError, discover_cases
from fedbrats.common.data.contract import CONTRASTS
from fedbrats.common.inference.modelfile import (
    PostprocessThresholds,
    Student,
    load_student,
    student_payload,
)
from fedbrats.common.inference.predict import output_paths, postprocess, predict_case, write_outputs
from fedbrats.common.networks.models import build_network, resolve_spec, student_spec
from fedbrats.common.utils.files import save_atomic

RUN = dataclasses.replace(PRESETS["tiny"], patch_size=16)  # 16^3 windows: fast
NAMES_2021 = {"t1n": "t1", "t1c": "t1ce", "t2w": "t2", "t2f": "flair"}


@pytest.fixture(scope="module")
def student_file(tmp_path_factory):
    torch.manual_seed(0)
    net = build_network(student_spec(RUN))
    path = tmp_path_factory.mktemp("model") / "student.pt"
    save_atomic(path, student_payload(RUN, net.state_dict(), server_round=2))
    return path


@pytest.fixture(scope="module")
def student(student_file):
    return load_student(student_file)


def seeded_state(run, ped_shift: float = 0.0) -> dict:
    """A seeded new student's weights; with ``ped_shift``, PED's head's last biases moved
    (towards SNFH, away from background) so that its segmentation differs from the others'."""
    from fedbrats.common.networks.models import head_population

    torch.manual_seed(0)
    state = build_network(student_spec(run)).state_dict()
    with torch.no_grad():
        for k, v in state.items():
            if head_population(k) == "PED" and k.endswith("conv.bias"):
                v.add_(torch.tensor([-ped_shift, 0.0, ped_shift, 0.0])[: v.numel()]
                       .reshape(v.shape))
    return state


def sphere_case(shape, spacing, seed=0):
    """A 'brain' ellipsoid with a bright-on-T1c spherical lesion, drawn in mm around the grid
    centre so that the same anatomy can be written on any grid. Returns images and seg."""
    rng = np.random.default_rng(seed)
    idx = np.indices(shape).astype(np.float32)
    mm = [(g - (n - 1) / 2) * s for g, n, s in zip(idx, shape, spacing)]
    half = [(n * s) / 2 for n, s in zip(shape, spacing)]
    brain = sum((x / (0.85 * h)) ** 2 for x, h in zip(mm, half)) < 1
    lesion = ((mm[0] - 6) ** 2 + (mm[1] + 4) ** 2 + mm[2] ** 2) < 9.0**2
    images = {}
    for i, key in enumerate(CONTRASTS):
        img = 100 + 20 * i + 5 * rng.standard_normal(shape)
        if key == "t1c":
            img = np.where(lesion, 400.0, img)
        images[key] = np.where(brain, img, 0).astype(np.int16)
    return images, (lesion & brain).astype(np.uint8) * 3


def write_case(folder, case_id, images, affine, seg=None, style="2023", skip=()):
    for key, arr in images.items():
        if key in skip:
            continue
        suffix = key if style == "2023" else NAMES_2021[key]
        sep = "-" if style == "2023" else "_"
        save_nifti(folder / case_id / f"{case_id}{sep}{suffix}.nii.gz", arr, affine)
    if seg is not None:
        sep = "-" if style == "2023" else "_"
        save_nifti(folder / case_id / f"{case_id}{sep}seg.nii.gz", seg, affine)
    return folder / case_id


def lps(images: dict, seg, affine):
    """The same anatomy stored LPS: first two array axes reversed, affine to match."""
    shape = next(iter(images.values())).shape
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[0, 3], flip[1, 3] = shape[0] - 1, shape[1] - 1
    return ({k: np.ascontiguousarray(v[::-1, ::-1]) for k, v in images.items()},
            np.ascontiguousarray(seg[::-1, ::-1]), affine @ flip)


def assert_same_grid(out_path, input_path):
    out, ref = nib.load(str(out_path)), nib.load(str(input_path))
    assert out.shape == ref.shape
    np.testing.assert_array_equal(out.affine, ref.affine)
    np.testing.assert_array_equal(out.header.get_zooms(), ref.header.get_zooms())
    assert out.header.get_sform(coded=True)[1] == ref.header.get_sform(coded=True)[1]


# --------------------------------------------------------------------------------------------
# Post-processing on hand-built label maps
# --------------------------------------------------------------------------------------------


def test_small_components_go_in_mm3_so_spacing_matters():
    labels = np.zeros((20, 20, 20), np.uint8)
    labels[2:7, 2:7, 2:7] = 2  # 125 voxels
    labels[12:14, 12:14, 12:14] = 1  # 8 voxels, apart
    thr = PostprocessThresholds(min_component_mm3=50, et_min_mm3=0)

    out, rep = postprocess(labels, (1.0, 1.0, 1.0), thr)  # 8 mm^3 < 50: removed
    assert not out[12:14, 12:14, 12:14].any() and (out[2:7, 2:7, 2:7] == 2).all()
    assert rep.removed_components == 1 and rep.removed_mm3 == 8.0
    out, rep = postprocess(labels, (2.0, 2.0, 2.0), thr)  # 64 mm^3 >= 50: kept
    np.testing.assert_array_equal(out, labels)
    assert rep.removed_components == 0
    out, _ = postprocess(labels, (1.0, 1.0, 6.0), thr)  # 48 mm^3 < 50: removed
    assert not out[12:14, 12:14, 12:14].any()
    assert labels[12, 12, 12] == 1  # the input is left alone


def test_components_are_26_connected():
    labels = np.zeros((12, 12, 12), np.uint8)
    labels[2:6, 2:6, 2:6] = 2  # 64 voxels
    labels[6, 6, 6] = 3  # touches the cube only at a corner: the same component
    labels[9, 9, 9] = 1  # alone: removed
    out, rep = postprocess(labels, (1.0, 1.0, 1.0), PostprocessThresholds(50, 0))
    assert out[6, 6, 6] == 3 and out[9, 9, 9] == 0 and rep.removed_components == 1


def test_small_et_becomes_netc_in_mm3():
    labels = np.zeros((20, 20, 20), np.uint8)
    labels[2:12, 2:12, 2:12] = 2
    labels[5:7, 5:10, 5:10] = 3  # 50 ET voxels
    labels[7:8, 5:8, 5:8] = 1
    thr = PostprocessThresholds(min_component_mm3=50, et_min_mm3=100)

    out, rep = postprocess(labels, (1.0, 1.0, 1.0), thr)  # 50 mm^3 < 100: relabelled
    assert not (out == 3).any() and (out[5:7, 5:10, 5:10] == 1).all()
    assert rep.et_relabelled_mm3 == 50.0 and rep.removed_components == 0
    np.testing.assert_array_equal(out == 2, labels == 2)
    out, rep = postprocess(labels, (1.0, 1.0, 3.0), thr)  # 150 mm^3: kept
    np.testing.assert_array_equal(out, labels)
    assert rep.et_relabelled_mm3 == 0.0


def test_et_rule_counts_what_is_left_after_removing_specks():
    labels = np.zeros((20, 20, 20), np.uint8)
    labels[2:8, 2:8, 2:8] = 2
    labels[3:5, 3:5, 3:5] = 3  # 8 ET voxels inside the lesion
    labels[15:18, 15:18, 15:18] = 3  # 27 ET voxels alone: a speck under 50 mm^3
    out, rep = postprocess(labels, (1.0, 1.0, 1.0), PostprocessThresholds(50, 20))
    assert rep.removed_components == 1 and rep.et_relabelled_mm3 == 8.0
    assert set(np.unique(out)) == {0, 1, 2}


def test_zero_thresholds_change_nothing():
    labels = np.zeros((8, 8, 8), np.uint8)
    labels[1, 1, 1], labels[4, 4, 4] = 3, 1
    out, rep = postprocess(labels, (1.0, 1.0, 1.0), PostprocessThresholds(0, 0))
    np.testing.assert_array_equal(out, labels)
    assert rep.removed_components == 0 and rep.et_relabelled_mm3 == 0


# --------------------------------------------------------------------------------------------
# Geometry: the output lies on the input's grid, and in the right place
# --------------------------------------------------------------------------------------------


class T1cOracle(nn.Module):
    """Predicts ET wherever the z-scored T1c is above 1.5: a network whose right answer is
    known, to check that predictions land where the anatomy is."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros((x.shape[0], 4, *x.shape[2:]), dtype=x.dtype, device=x.device)
        logits[:, 1:3] = -20.0
        logits[:, 3] = 8.0 * (x[:, CONTRASTS.index("t1c")] - 1.5)
        return logits


@pytest.mark.parametrize(
    ("orientation", "spacing", "shape"),
    [("RAS", (1.0, 1.0, 3.0), (48, 48, 16)),
     ("LPS", (1.0, 1.0, 3.0), (48, 48, 16)),
     ("LPS", (2.0, 2.0, 2.0), (24, 24, 24))],
)
def test_predictions_land_on_the_anatomy(tmp_path, orientation, spacing, shape):
    images, seg = sphere_case(shape, spacing)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = [-40.0, 12.5, -7.0]
    if orientation == "LPS":
        images, seg, affine = lps(images, seg, affine)
    assert nib.aff2axcodes(affine) == tuple(orientation)
    case_dir = write_case(tmp_path / "in", "BraTS-GLI-00001-000", images, affine, seg)
    oracle = Student(T1cOracle(), resolve_spec("student-tiny"), (2.0, 2.0, 2.0), (32, 32, 32))

    result = predict_case(oracle, discover_cases(case_dir)[0], apply_postprocess=False)
    assert result.labels.shape == shape and result.labels.dtype == np.uint8
    pred, gt = result.labels == 3, seg == 3
    dice = 2 * np.count_nonzero(pred & gt) / (np.count_nonzero(pred) + np.count_nonzero(gt))
    assert dice > 0.85, dice
    assert result.volumes_mm3["ET"] == pytest.approx(gt.sum() * math.prod(spacing), rel=0.2)

    written = write_outputs(result, tmp_path / "out")
    assert_same_grid(written["seg"], case_dir / "BraTS-GLI-00001-000-t1c.nii.gz")
    np.testing.assert_array_equal(np.asarray(nib.load(written["seg"]).dataobj), result.labels)


def test_lps_and_ras_copies_give_the_same_segmentation(tmp_path, student):
    """The real (untrained) student: the same anatomy stored RAS and LPS segments the same."""
    images, seg = sphere_case((40, 36, 30), (2.0, 2.0, 2.0))
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    ras_dir = write_case(tmp_path / "ras", "BraTS-MEN-00002-000", images, affine)
    lps_dir = write_case(tmp_path / "lps", "BraTS-MEN-00002-000", *lps(images, seg, affine)[::2])

    results = []
    for case_dir in (ras_dir, lps_dir):
        r = predict_case(student, discover_cases(case_dir)[0], uncertainty="entropy")
        written = write_outputs(r, case_dir.parent / "out")
        assert_same_grid(written["seg"], case_dir / "BraTS-MEN-00002-000-t1n.nii.gz")
        assert_same_grid(written["entropy"], case_dir / "BraTS-MEN-00002-000-t1n.nii.gz")
        results.append(r)
    ras, flipped = results[0], results[1]
    assert len(np.unique(ras.labels)) > 1  # not a trivial all-background answer
    back = flipped.labels[::-1, ::-1]
    assert np.mean(back == ras.labels) > 0.999
    np.testing.assert_allclose(flipped.uncertainty[::-1, ::-1], ras.uncertainty, atol=1e-4)
    assert ras.uncertainty.dtype == np.float32
    assert 0 <= ras.uncertainty.min() and ras.uncertainty.max() <= math.log(4) + 1e-5


def test_a_prenormalised_case_with_a_constant_background_segments_as_the_raw_one(
        tmp_path, student, monkeypatch):
    """The same case shipped z-scored with its background at -3.6 (float32) gives the
    segmentation of the raw, zero-background copy: the fill is taken for the background. On
    the student's own grid (4 mm here), so that no resampling blends the brain's edge with a
    background that means another intensity in each copy."""
    images, _ = sphere_case((30, 28, 24), (4.0, 4.0, 4.0))
    affine = np.diag([4.0, 4.0, 4.0, 1.0])
    z = {}
    for key, arr in images.items():
        a = arr.astype(np.float32)
        brain = a != 0
        z[key] = np.where(brain, (a - a[brain].mean()) / a[brain].std(), -3.6).astype(np.float32)
    raw_dir = write_case(tmp_path / "raw", "BraTS-MEN-00004-000", images, affine)
    z_dir = write_case(tmp_path / "z", "BraTS-MEN-00004-000", z, affine)
    raw, shipped = (predict_case(student, discover_cases(d)[0])
                    for d in (raw_dir, z_dir))
    assert student.spacing == (4.0, 4.0, 4.0) and len(np.unique(raw.labels)) > 1
    assert np.mean(raw.labels == shipped.labels) > 0.999
    monkeypatch.setattr(cases_module, "background_of", lambda volume: None)  # as before
    before = predict_case(student, discover_cases(z_dir)[0])
    assert np.mean(raw.labels == before.labels) < 0.9


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


def test_predict_a_brats2021_site_with_a_missing_contrast(tmp_path, student_file, capsys):
    site = tmp_path / "site"
    for n, skip in enumerate(((), ("t2f",))):
        images, seg = sphere_case((32, 32, 12), (1.5, 1.5, 4.0), seed=n)
        write_case(site, f"BraTS2021_0000{n}", images, np.diag([1.5, 1.5, 4.0, 1.0]), seg,
                   style="2021", skip=skip)
    out = tmp_path / "out"
    rc = main(["predict", "--model", str(student_file), "--input", str(site), "--out", str(out),
               "--labels", "brats2021", "--overlay", "--uncertainty", "tta", "--device", "cpu",
               "--no-progress"])
    stdout = capsys.readouterr().out
    assert rc == 0, stdout
    assert ("BraTS2021_00001: missing t2f (zero-filled after normalisation; the student was "
            "never trained without t2f") in stdout
    assert "2 of 2 case(s) written" in stdout
    for n in range(2):
        cid = f"BraTS2021_0000{n}"
        paths = output_paths(cid, out)
        assert paths["seg"].name == f"{cid}.nii.gz"
        ref = site / cid / f"{cid}_t1.nii.gz"
        assert_same_grid(paths["seg"], ref)
        seg = nib.load(paths["seg"])
        assert seg.get_data_dtype() == np.uint8
        assert set(np.unique(np.asarray(seg.dataobj))) <= {0, 1, 2, 4}  # BraTS 2021 labels
        assert_same_grid(paths["tta"], ref)
        var = nib.load(paths["tta"])
        assert var.get_data_dtype() == np.float32 and np.asarray(var.dataobj).min() >= 0
        assert paths["overlay"].stat().st_size > 5000
        assert not paths["entropy"].exists()


def test_tta_segments_with_the_flip_average_and_writes_no_map(tmp_path, student, student_file,
                                                               capsys):
    images, seg = sphere_case((28, 26, 24), (2.0, 2.0, 2.0))
    case_dir = write_case(tmp_path / "in", "BraTS-PED-00003-000", images, np.eye(4) * [2, 2, 2, 1])
    case = discover_cases(case_dir)[0]
    plain = predict_case(student, case, apply_postprocess=False)
    averaged = predict_case(student, case, apply_postprocess=False, tta=True)
    with_map = predict_case(student, case, apply_postprocess=False, uncertainty="tta")
    assert averaged.uncertainty is None and with_map.uncertainty is not None
    np.testing.assert_array_equal(averaged.labels, with_map.labels)  # one and the same average
    assert not np.array_equal(averaged.labels, plain.labels)  # an untrained net is not symmetric

    out = tmp_path / "out"
    rc = main(["predict", "--model", str(student_file), "--input", str(case_dir), "--out",
               str(out), "--tta", "--no-postprocess", "--device", "cpu", "--no-progress"])
    assert rc == 0, capsys.readouterr().out
    paths = output_paths("BraTS-PED-00003-000", out)
    np.testing.assert_array_equal(np.asarray(nib.load(paths["seg"]).dataobj), averaged.labels)
    assert not paths["tta"].exists()


def test_a_manifest_and_no_postprocess(tmp_path, student, student_file, capsys):
    images, seg = sphere_case((24, 24, 24), (2.0, 2.0, 2.0))
    case_dir = write_case(tmp_path / "files", "case7", images, np.eye(4) * [2, 2, 2, 1], seg)
    manifest = tmp_path / "cases.csv"
    rows = ",".join(f"files/case7/case7-{k}.nii.gz" for k in CONTRASTS)
    manifest.write_text(f"case_id,{','.join(CONTRASTS)}\ncase7,{rows}\n")
    rc = main(["predict", "--model", str(student_file), "--input", str(manifest),
               "--out", str(tmp_path / "out"), "--no-postprocess", "--device", "cpu",
               "--no-progress"])
    assert rc == 0, capsys.readouterr().out
    written = np.asarray(nib.load(tmp_path / "out" / "case7.nii.gz").dataobj)
    raw = predict_case(student, discover_cases(case_dir)[0], apply_postprocess=False)
    np.testing.assert_array_equal(written, raw.labels)  # brats2023 is the internal convention


def test_clear_errors(tmp_path, student_file, capsys):
    rc = main(["predict", "--model", str(student_file), "--input", str(tmp_path / "nowhere"),
               "--out", str(tmp_path / "out")])
    assert rc == 2
    assert "nowhere: input not found; expected a case folder" in capsys.readouterr().err

    corrupt = tmp_path / "student.pt"
    corrupt.write_bytes(student_file.read_bytes()[:1000])
    images, _ = sphere_case((16, 16, 16), (2.0, 2.0, 2.0))
    case_dir = write_case(tmp_path / "in", "BraTS-GLI-00003-000", images, np.eye(4))
    rc = main(["predict", "--model", str(corrupt), "--input", str(case_dir),
               "--out", str(tmp_path / "out")])
    assert rc == 2
    err = capsys.readouterr().err
    assert str(corrupt) in err and "truncated or corrupt" in err

    foreign = tmp_path / "weights.pt"
    torch.save({"weight": torch.zeros(2)}, foreign)
    rc = main(["predict", "--model", str(foreign), "--input", str(case_dir),
               "--out", str(tmp_path / "out")])
    assert rc == 2 and "not a fedbrats student file" in capsys.readouterr().err

    empty = tmp_path / "empty"
    empty.mkdir()
    rc = main(["predict", "--model", str(student_file), "--input", str(empty),
               "--out", str(tmp_path / "out")])
    assert rc == 2 and "no cases found" in capsys.readouterr().err

    if not torch.cuda.is_available():
        rc = main(["predict", "--model", str(student_file), "--input", str(case_dir),
                   "--out", str(tmp_path / "out"), "--device", "cuda"])
        assert rc == 2 and "torch sees no CUDA device" in capsys.readouterr().err


def test_a_bad_case_is_reported_and_the_others_written(tmp_path, student_file, capsys):
    site = tmp_path / "site"
    images, _ = sphere_case((16, 16, 16), (2.0, 2.0, 2.0))
    write_case(site, "BraTS-GLI-00000-000", images, np.diag([2.0, 2.0, 2.0, 1.0]))
    bad = write_case(site, "BraTS-GLI-00001-000", images, np.diag([2.0, 2.0, 2.0, 1.0]))
    (bad / "BraTS-GLI-00001-000-t2w.nii.gz").write_bytes(b"\x1f\x8b broken")
    rc = main(["predict", "--model", str(student_file), "--input", str(site),
               "--out", str(tmp_path / "out"), "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "BraTS-GLI-00001-000: FAILED" in out and "unreadable or truncated NIfTI" in out
    assert (tmp_path / "out" / "BraTS-GLI-00000-000.nii.gz").is_file()
    assert not (tmp_path / "out" / "BraTS-GLI-00001-000.nii.gz").exists()


def test_predict_case_raises_data_error_for_an_unusable_case(tmp_path, student):
    images, _ = sphere_case((16, 16, 16), (2.0, 2.0, 2.0))
    images["t1c"] = np.zeros_like(images["t1c"])
    case_dir = write_case(tmp_path, "BraTS-GLI-00004-000", images, np.eye(4))
    with pytest.raises(DataError, match="t1c file .*empty image"):
        predict_case(student, discover_cases(case_dir)[0])


def test_a_student_with_a_head_per_population_segments_with_the_one_asked_for(tmp_path,
                                                                              capsys):
    run = dataclasses.replace(RUN, student_heads="population")
    state = seeded_state(run, ped_shift=5.0)
    path = tmp_path / "student.pt"
    save_atomic(path, student_payload(run, state, server_round=3))
    images, _ = sphere_case((24, 24, 24), (2.0, 2.0, 2.0))
    case_dir = write_case(tmp_path / "in", "BraTS-PED-00001-000", images,
                          np.eye(4) * [2, 2, 2, 1])
    case = discover_cases(case_dir)[0]
    by_head = {p: predict_case(load_student(path, population=p), case,
                               apply_postprocess=False).labels for p in ("GLI", "PED", None)}
    assert load_student(path).heads == ("GLI", "SSA", "PED", "MEN", "MET")
    assert not np.array_equal(by_head["PED"], by_head["GLI"])
    out = tmp_path / "out"
    for population, expected in (("PED", by_head["PED"]), (None, by_head[None])):
        args = ["--population", population] if population else []
        rc = main(["predict", "--model", str(path), "--input", str(case_dir), "--out", str(out),
                   "--no-postprocess", "--device", "cpu", "--no-progress", *args])
        stdout = capsys.readouterr().out
        assert rc == 0, stdout
        assert ("PED's segments" if population else "the mean of all of them segments") in stdout
        np.testing.assert_array_equal(
            np.asarray(nib.load(out / "BraTS-PED-00001-000.nii.gz").dataobj), expected)
    with pytest.raises(SystemExit):
        main(["predict", "--model", str(path), "--input", str(case_dir), "--out", str(out),
              "--population", "ADULT"])
    assert "invalid choice: 'ADULT'" in capsys.readouterr().err
