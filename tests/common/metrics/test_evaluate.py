"""``fedbrats evaluate``: hand-built NIfTI cases whose scores are known, pairing, and checks."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
from conftest import save_nifti

from fedbrats.common.cli import build_parser, main
from fedbrats.common.metrics.brats import HD95_MAX_MM
from fedbrats.common.metrics.evaluate import (
    PER_CASE_COLUMNS,
    EvaluationError,
    evaluate_folders,
    pair_cases,
    seg_case_id,
    sensitivity_specificity,
    write_results,
)

SHAPE = (32, 32, 24)


def tumour() -> np.ndarray:
    """One lesion: a 6x6x6 cube of SNFH around a 4x4x4 NETC with a 2x2x2 ET centre (2023 labels)."""
    seg = np.zeros(SHAPE, dtype=np.uint8)
    seg[8:14, 8:14, 8:14] = 2
    seg[9:13, 9:13, 9:13] = 1
    seg[10:12, 10:12, 10:12] = 3
    return seg


def two_metastases() -> tuple[np.ndarray, np.ndarray]:
    """A 4x4x4 ET lesion (64 mm^3) and a 2x2x2 one (8 mm^3) far from it; and the big one alone."""
    gt = np.zeros(SHAPE, dtype=np.uint8)
    gt[4:8, 4:8, 4:8] = 3
    gt[20:22, 20:22, 14:16] = 3
    big_only = np.zeros(SHAPE, dtype=np.uint8)
    big_only[4:8, 4:8, 4:8] = 3
    return gt, big_only


def read_rows(path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_case_ids_from_file_names():
    cases = {
        "BraTS-GLI-00001-000-seg.nii.gz": "BraTS-GLI-00001-000",
        "BraTS-GLI-00001-000.nii.gz": "BraTS-GLI-00001-000",
        "BraTS2021_00001_seg.nii.gz": "BraTS2021_00001",
        "BraTS2021_00001.nii": "BraTS2021_00001",
        "case7.nii.gz": "case7",
        "BraTS-GLI-00001-000-t1c.nii.gz": None,  # input contrasts are skipped
        "BraTS2021_00001_flair.nii.gz": None,
        "BraTS-GLI-00001-000_entropy.nii.gz": None,  # fedbrats predict's uncertainty maps
        "BraTS-GLI-00001-000_tta_var.nii.gz": None,
        "BraTS-GLI-00001-000.nii.gz.tmp.nii.gz": None,
        ".hidden.nii.gz": None,
        "notes.txt": None,
    }
    for name, expected in cases.items():
        assert seg_case_id(name) == expected, name


def test_sensitivity_specificity_rules():
    gt = np.zeros((4, 4, 4), bool)
    gt[0, 0, :2] = True  # 2 voxels
    pred = np.zeros_like(gt)
    pred[0, 0, 1:3] = True  # 1 hit, 1 false positive
    sens, spec = sensitivity_specificity(pred, gt)
    assert sens == 0.5 and spec == pytest.approx(61 / 62)
    empty = np.zeros_like(gt)
    assert sensitivity_specificity(empty, empty) == (1.0, 1.0)
    assert sensitivity_specificity(pred, empty)[0] == 0.0  # official: 0 / (0 + eps)


def test_perfect_empty_and_partial_predictions_have_known_scores(tmp_path):
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    seg = tumour()
    for cid in ("BraTS-GLI-00001-000", "BraTS-GLI-00002-000"):
        save_nifti(gt_dir / cid / f"{cid}-seg.nii.gz", seg)  # BraTS 2023 case folders
    save_nifti(pred_dir / "BraTS-GLI-00001-000.nii.gz", seg)  # perfect
    save_nifti(pred_dir / "BraTS-GLI-00002-000-seg.nii.gz", np.zeros(SHAPE, np.uint8))  # empty

    result = evaluate_folders(pred_dir, gt_dir, "GLI")
    assert not result.failed and not result.pred_only and not result.gt_only
    perfect, empty = result.per_case["BraTS-GLI-00001-000"], result.per_case["BraTS-GLI-00002-000"]
    volumes = {"WT": 216.0, "TC": 64.0, "ET": 8.0}
    for region in ("WT", "TC", "ET"):
        p = perfect[region]
        assert (p["dice"], p["hd95"], p["lesion_dice"], p["lesion_hd95"]) == (1.0, 0.0, 1.0, 0.0)
        assert (p["sensitivity"], p["specificity"]) == (1.0, 1.0)
        assert p["gt_volume_mm3"] == p["pred_volume_mm3"] == volumes[region]
        e = empty[region]
        assert (e["dice"], e["hd95"], e["sensitivity"], e["specificity"]) == (
            0.0,
            HD95_MAX_MM,
            0.0,
            1.0,
        )
        assert e["pred_volume_mm3"] == 0.0
    # Lesion counts: the WT and TC lesions are over GLI's 50 mm^3 threshold; ET (8 mm^3) is not.
    assert [perfect[r]["lesion_tp"] for r in ("WT", "TC", "ET")] == [1, 1, 0]
    assert (empty["WT"]["lesion_dice"], empty["WT"]["lesion_hd95"]) == (0.0, HD95_MAX_MM)
    assert (empty["WT"]["lesion_tp"], empty["WT"]["lesion_fn"], empty["WT"]["lesion_fp"]) == (
        0,
        1,
        0,
    )
    # ET's only lesion is under the threshold: dropped, so 0/0 -> Dice 1, HD95 0 (official rule).
    assert (empty["ET"]["lesion_dice"], empty["ET"]["lesion_fn"]) == (1.0, 0)

    paths = write_results(result, tmp_path / "out")
    rows = read_rows(paths["per_case"])
    assert list(rows[0]) == list(PER_CASE_COLUMNS)
    assert [(r["case_id"], r["region"]) for r in rows] == [
        (c, r) for c in ("BraTS-GLI-00001-000", "BraTS-GLI-00002-000") for r in ("WT", "TC", "ET")
    ]
    summary = {(r["region"], r["metric"]): r for r in read_rows(paths["summary"])}
    wt_dice = summary[("WT", "dice")]
    assert (wt_dice["n"], float(wt_dice["mean"]), float(wt_dice["median"])) == ("2", 0.5, 0.5)
    assert float(summary[("WT", "hd95")]["mean"]) == HD95_MAX_MM / 2
    assert summary[("WT", "lesion_fn")]["total"] == "1" and summary[("WT", "dice")]["total"] == ""
    assert read_rows(paths["issues"]) == []


def test_missed_small_metastasis_is_a_false_negative_in_met_only(tmp_path):
    gt, big_only = two_metastases()
    save_nifti(tmp_path / "gt" / "BraTS-MET-00001-000-seg.nii.gz", gt)
    save_nifti(tmp_path / "pred" / "BraTS-MET-00001-000.nii.gz", big_only)

    met = evaluate_folders(tmp_path / "pred", tmp_path / "gt", "MET").per_case
    for region in ("WT", "TC", "ET"):
        s = met["BraTS-MET-00001-000"][region]
        # MET keeps lesions over 2 mm^3: the missed 8 mm^3 lesion is a false negative.
        assert (s["lesion_tp"], s["lesion_fn"], s["lesion_fp"]) == (1, 1, 0)
        assert s["lesion_dice"] == pytest.approx(0.5)
        assert s["lesion_hd95"] == pytest.approx(HD95_MAX_MM / 2)
        assert s["dice"] == pytest.approx(2 * 64 / (64 + 72))
        assert s["sensitivity"] == pytest.approx(64 / 72)

    # GLI's threshold (50 mm^3) drops the small lesion: nothing is missed.
    gli = evaluate_folders(tmp_path / "pred", tmp_path / "gt", "GLI")
    s = gli.per_case["BraTS-MET-00001-000"]["WT"]
    assert (s["lesion_tp"], s["lesion_fn"], s["lesion_dice"]) == (1, 0, 1.0)
    assert any("case ids name MET but the challenge is GLI" in w for w in gli.warnings)


def test_unpaired_files_are_listed_on_both_sides(tmp_path, capsys):
    seg = tumour()
    for cid in ("BraTS-PED-00001-000", "BraTS-PED-00002-000"):
        save_nifti(tmp_path / "gt" / f"{cid}-seg.nii.gz", seg)
    save_nifti(tmp_path / "gt" / "BraTS-PED-00002-000-t2f.nii.gz", seg)  # an image: skipped
    save_nifti(tmp_path / "pred" / "BraTS-PED-00001-000.nii.gz", seg)
    save_nifti(tmp_path / "pred" / "BraTS-PED-00009-000.nii.gz", seg)

    pairing = pair_cases(tmp_path / "pred", tmp_path / "gt")
    assert [p.case_id for p in pairing.pairs] == ["BraTS-PED-00001-000"]
    assert [cid for cid, _ in pairing.pred_only] == ["BraTS-PED-00009-000"]
    assert [cid for cid, _ in pairing.gt_only] == ["BraTS-PED-00002-000"]

    out = tmp_path / "out"
    args = ["evaluate", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt")]
    assert main([*args, "--challenge", "ped", "--out", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "1 prediction file(s) have no ground truth: BraTS-PED-00009-000.nii.gz" in text
    assert "1 ground-truth file(s) have no prediction: BraTS-PED-00002-000-seg.nii.gz" in text
    assert "PED: 1 of 1 paired cases scored" in text
    issues = read_rows(out / "issues.csv")
    assert [(r["kind"], r["case_id"]) for r in issues] == [
        ("pred_unpaired", "BraTS-PED-00009-000"),
        ("gt_unpaired", "BraTS-PED-00002-000"),
    ]


def test_nothing_pairs_is_an_error(tmp_path, capsys):
    save_nifti(tmp_path / "gt" / "BraTS-GLI-00001-000-seg.nii.gz", tumour())
    save_nifti(tmp_path / "pred" / "BraTS-GLI-00002-000.nii.gz", tumour())
    with pytest.raises(EvaluationError, match="no prediction in .* pairs with a ground truth"):
        evaluate_folders(tmp_path / "pred", tmp_path / "gt", "GLI")
    args = ["evaluate", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "missing")]
    assert main([*args, "--challenge", "GLI", "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    text = capsys.readouterr().out
    assert "ground-truth folder" in text and "not found" in text


def test_shape_and_affine_mismatches_name_both_files_and_the_rest_is_scored(tmp_path, capsys):
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    seg = tumour()
    for cid in ("BraTS-SSA-00001-000", "BraTS-SSA-00002-000", "BraTS-SSA-00003-000"):
        save_nifti(gt_dir / f"{cid}-seg.nii.gz", seg)
    save_nifti(pred_dir / "BraTS-SSA-00001-000.nii.gz", seg)
    save_nifti(pred_dir / "BraTS-SSA-00002-000.nii.gz", seg[:, :, :20])  # wrong shape
    shifted = np.eye(4)
    shifted[0, 3] = 2.0
    save_nifti(pred_dir / "BraTS-SSA-00003-000.nii.gz", seg, affine=shifted)  # wrong affine

    result = evaluate_folders(pred_dir, gt_dir, "SSA")
    assert list(result.per_case) == ["BraTS-SSA-00001-000"]
    shape_err, affine_err = (f.message for f in result.failed)
    assert "shape mismatch" in shape_err
    assert str(gt_dir / "BraTS-SSA-00002-000-seg.nii.gz") in shape_err
    assert str(pred_dir / "BraTS-SSA-00002-000.nii.gz") in shape_err
    assert "(32, 32, 24)" in shape_err and "(32, 32, 20)" in shape_err
    assert "affine mismatch" in affine_err and "by up to 2 mm" in affine_err
    assert "BraTS-SSA-00003-000.nii.gz" in affine_err

    out = tmp_path / "out"
    args = ["evaluate", "--pred", str(pred_dir), "--gt", str(gt_dir), "--challenge", "SSA"]
    assert main([*args, "--out", str(out), "--no-progress"]) == 1
    text = capsys.readouterr().out
    assert "SSA: 1 of 3 paired cases scored" in text and "2 case(s) could not be scored" in text
    assert len(read_rows(out / "per_case.csv")) == 3
    failed = [r for r in read_rows(out / "issues.csv") if r["kind"] == "failed"]
    assert [r["case_id"] for r in failed] == ["BraTS-SSA-00002-000", "BraTS-SSA-00003-000"]
    assert failed[0]["pred_file"].endswith("BraTS-SSA-00002-000.nii.gz")


def test_brats2021_ground_truth_with_labels_option(tmp_path, capsys):
    seg2023 = tumour()
    seg2021 = np.where(seg2023 == 3, 4, seg2023).astype(np.uint8)  # ET is 4 in 2017-2021
    gt_dir = tmp_path / "gt"
    save_nifti(gt_dir / "BraTS2021_00001" / "BraTS2021_00001_seg.nii.gz", seg2021)
    save_nifti(gt_dir / "BraTS2021_00001" / "BraTS2021_00001_flair.nii.gz", seg2021)  # skipped
    save_nifti(tmp_path / "pred2023" / "BraTS2021_00001.nii.gz", seg2023)
    save_nifti(tmp_path / "pred2021" / "BraTS2021_00001_seg.nii.gz", seg2021)

    # Without --labels the 2021 ground truth is refused, with a hint.
    result = evaluate_folders(tmp_path / "pred2023", gt_dir, "GLI")
    (failure,) = result.failed
    assert "ground truth" in failure.message and "pass --labels brats2021" in failure.message

    both_2021 = evaluate_folders(tmp_path / "pred2021", gt_dir, "GLI", labels="brats2021")
    mixed = evaluate_folders(
        tmp_path / "pred2023", gt_dir, "GLI", labels="brats2021", pred_labels="brats2023"
    )
    for result in (both_2021, mixed):
        scores = result.per_case["BraTS2021_00001"]
        assert all(scores[r]["dice"] == 1.0 and scores[r]["hd95"] == 0.0 for r in scores)
        assert scores["ET"]["gt_volume_mm3"] == 8.0  # label 4 became ET

    # A 2023 prediction read as 2021 has an unknown value 3: the hint names --pred-labels.
    wrong = evaluate_folders(tmp_path / "pred2023", gt_dir, "GLI", labels="brats2021")
    (failure,) = wrong.failed
    assert "prediction" in failure.message and "--pred-labels brats2023" in failure.message

    args = ["evaluate", "--pred", str(tmp_path / "pred2023"), "--gt", str(gt_dir)]
    args += ["--challenge", "GLI", "--labels", "brats2021", "--pred-labels", "brats2023"]
    assert main([*args, "--out", str(tmp_path / "o"), "--no-progress"]) == 0
    assert "GLI: 1 of 1 paired cases scored" in capsys.readouterr().out


def test_two_predictions_for_one_case_is_a_failure_not_a_guess(tmp_path):
    seg = tumour()
    save_nifti(tmp_path / "gt" / "BraTS-MEN-00001-000-seg.nii.gz", seg)
    save_nifti(tmp_path / "gt" / "BraTS-MEN-00002-000-seg.nii.gz", seg)
    save_nifti(tmp_path / "pred" / "BraTS-MEN-00001-000.nii.gz", seg)
    save_nifti(tmp_path / "pred" / "BraTS-MEN-00001-000-seg.nii.gz", seg)
    save_nifti(tmp_path / "pred" / "BraTS-MEN-00002-000.nii.gz", seg)
    result = evaluate_folders(tmp_path / "pred", tmp_path / "gt", "MEN")
    assert list(result.per_case) == ["BraTS-MEN-00002-000"]
    (failure,) = result.failed
    assert failure.case_id == "BraTS-MEN-00001-000" and "2 prediction files" in failure.message


def test_non_finite_prediction_fails_that_case(tmp_path):
    seg = tumour()
    save_nifti(tmp_path / "gt" / "c1.nii.gz", seg)
    bad = seg.astype(np.float32)
    bad[0, 0, 0] = math.nan
    save_nifti(tmp_path / "pred" / "c1.nii.gz", bad)
    (failure,) = evaluate_folders(tmp_path / "pred", tmp_path / "gt", "GLI").failed
    assert "contains NaN or inf" in failure.message


@pytest.mark.parametrize("command", ["evaluate", "certs"])
def test_full_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    assert f"usage: fedbrats {command}" in capsys.readouterr().out
    sub = build_parser()._subparsers._group_actions[0].choices[command]
    for action in sub._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"{command} {action.option_strings} has no help text"


def test_ground_truth_from_a_manifest(tmp_path, capsys):
    seg = tumour()
    save_nifti(tmp_path / "labels" / "p1_mask.nii.gz", seg)
    save_nifti(tmp_path / "labels" / "p2_mask.nii.gz", seg)
    manifest = tmp_path / "cases.csv"
    manifest.write_text("case_id,t1n,t1c,t2w,t2f,seg\n"
                        "p1,scans/p1_t1.nii.gz,,,,labels/p1_mask.nii.gz\n"
                        "p2,scans/p2_t1.nii.gz,,,,labels/p2_mask.nii.gz\n"
                        "p3,scans/p3_t1.nii.gz,,,,\n")  # no ground truth: left out
    shifted = np.roll(seg, 2, axis=0)
    save_nifti(tmp_path / "pred" / "p1.nii.gz", seg)
    save_nifti(tmp_path / "pred" / "p2.nii.gz", shifted)
    pairing = pair_cases(tmp_path / "pred", manifest)
    assert [p.case_id for p in pairing.pairs] == ["p1", "p2"]
    assert pairing.pairs[0].gt == tmp_path / "labels" / "p1_mask.nii.gz"
    out = tmp_path / "o"
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--gt", str(manifest),
                 "--challenge", "GLI", "--out", str(out), "--no-progress"]) == 0
    assert "GLI: 2 of 2 paired cases scored" in capsys.readouterr().out
    rows = {(r["case_id"], r["region"]): r for r in csv.DictReader((out / "per_case.csv").open())}
    assert float(rows[("p1", "WT")]["dice"]) == 1.0
    assert float(rows[("p2", "WT")]["dice"]) == pytest.approx(2 * 4 * 36 / (2 * 6 * 36))
    (tmp_path / "bad.csv").write_text("case_id,t1n\np1,a.nii.gz\n")
    with pytest.raises(EvaluationError, match="no case has a seg file"):
        pair_cases(tmp_path / "pred", tmp_path / "bad.csv")
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "x.csv"),
                 "--challenge", "GLI", "--out", str(out), "--no-progress"]) == 2
    said = capsys.readouterr()
    assert "x.csv: manifest not found" in said.out + said.err
