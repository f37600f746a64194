"""``fedbrats evaluate --uncertainty``: hand-checked ECE, risk-coverage and AURC, Spearman;
maps whose errors are known; and the chain from ``fedbrats predict --uncertainty``."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
from conftest import save_nifti

from fedbrats.common.cli import main
from fedbrats.common.metrics.uncertainty import (
    aurc,
    case_figures,
    ece_bins,
    ece_of,
    risk_coverage,
    spearman,
)


def test_ece_by_hand():
    # 10 voxels at confidence 0.95, 9 of them right; 10 at 0.55, 5 right
    conf = np.r_[np.full(10, 0.95), np.full(10, 0.55)]
    correct = np.r_[np.ones(9), 0, np.ones(5), np.zeros(5)].astype(bool)
    table = ece_bins(conf, correct)
    assert table[:, 0].sum() == 20 and table[14, 0] == 10 and table[8, 0] == 10
    assert ece_of(table) == pytest.approx(0.5 * abs(0.9 - 0.95) + 0.5 * abs(0.5 - 0.55))
    assert ece_of(ece_bins(np.array([1.0, 1.0]), np.array([True, True]))) == 0.0  # conf 1 binned
    assert math.isnan(ece_of(np.zeros((15, 3))))


def test_risk_coverage_and_aurc_by_hand():
    error = np.array([0, 0, 1, 0, 1], bool)
    perfect = np.array([0.1, 0.2, 0.9, 0.3, 0.8])  # errors are the least certain
    cov, risk = risk_coverage(perfect, error)
    np.testing.assert_allclose(cov, [0.2, 0.4, 0.6, 0.8, 1.0])
    np.testing.assert_allclose(risk, [0, 0, 0, 1 / 4, 2 / 5])
    best = aurc(cov, risk)
    assert best == pytest.approx(np.trapezoid([0, 0, 0, 0.25, 0.4], [0.2, 0.4, 0.6, 0.8, 1.0]))
    worst = aurc(*risk_coverage(-perfect, error))
    assert worst > best
    assert spearman(perfect, error) == pytest.approx(np.corrcoef([1, 2, 5, 3, 4],
                                                                 [2, 2, 4.5, 2, 4.5])[0, 1])
    assert math.isnan(spearman(np.ones(5), error))


def test_only_the_voxels_the_network_scored_count():
    gt = np.zeros((10, 10, 10), np.uint8)
    gt[4:6, 4:6, 4:6] = 2
    pred = gt.copy()
    pred[4, 4, 4] = 0  # one error
    unc = np.zeros(gt.shape, np.float32)
    unc[2:8, 2:8, 2:8] = 0.01  # the box the network ran on
    unc[4, 4, 4] = 1.0  # the error is the least certain voxel
    figures, _ = case_figures(pred, gt, unc, None)
    assert figures["voxels"] == 6**3
    assert figures["error_rate"] == pytest.approx(1 / 216)
    assert figures["aurc"] == pytest.approx(figures["aurc_optimal"])
    assert figures["spearman"] == pytest.approx(1.0)  # two ranks only: the error is highest
    assert figures["wt_dice"] == pytest.approx(2 * 7 / 15)
    assert math.isnan(figures["ece"])


def _case(folder, pred_folder, case_id, rng, informative: bool):
    """A ground truth, a prediction with errors on a known set of voxels, and uncertainty
    and confidence maps that do (or do not) point at them."""
    shape = (20, 20, 20)
    gt = np.zeros(shape, np.uint8)
    gt[5:15, 5:15, 5:15] = 2
    gt[8:12, 8:12, 8:12] = 3
    pred = gt.copy()
    wrong = rng.random(shape) < 0.05
    pred[wrong] = (pred[wrong] + 1) % 4
    unc = np.where(wrong, 0.8, 0.2) if informative else rng.random(shape)
    unc = (unc + 0.01 * rng.random(shape)).astype(np.float32)
    conf = np.where(wrong, 0.5, 0.95).astype(np.float32)
    save_nifti(folder / case_id / f"{case_id}-seg.nii.gz", gt)
    save_nifti(pred_folder / f"{case_id}.nii.gz", pred)
    save_nifti(pred_folder / f"{case_id}_entropy.nii.gz", unc)
    save_nifti(pred_folder / f"{case_id}_confidence.nii.gz", conf)
    return wrong


def test_evaluate_uncertainty_on_maps_whose_errors_are_known(tmp_path, capsys):
    rng = np.random.default_rng(0)
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    wrong = {}
    for n, informative in enumerate((True, True, True, False)):
        wrong[n] = _case(gt, pred, f"BraTS-GLI-0000{n}-000", rng, informative)
    out = tmp_path / "eval"
    rc = main(["evaluate", "--pred", str(pred), "--gt", str(gt), "--challenge", "GLI",
               "--uncertainty", str(pred), "--out", str(out), "--no-progress"])
    stdout = capsys.readouterr().out
    assert rc == 0, stdout
    assert "GLI: 4 of 4 paired cases scored" in stdout  # the maps are not taken for predictions
    with (out / "uncertainty_per_case.csv").open() as fh:
        rows = {r["case_id"]: r for r in csv.DictReader(fh)}
    assert len(rows) == 4
    for n in range(3):  # the informative maps rank every error last
        r = rows[f"BraTS-GLI-0000{n}-000"]
        # a rank correlation with a 0/1 error is bounded even for a perfect ranking: with a
        # fraction e of errors and no ties it is sqrt(3 e (1 - e)), 0.38 at e = 0.05
        e = wrong[n].mean()
        assert float(r["spearman"]) == pytest.approx(math.sqrt(3 * e * (1 - e)), rel=0.02)
        assert float(r["aurc"]) == pytest.approx(float(r["aurc_optimal"]), abs=1e-3)
    assert abs(float(rows["BraTS-GLI-00003-000"]["spearman"])) < 0.1
    # ECE by hand: confidence 0.95 on the right voxels, 0.5 on the wrong (inside the box where
    # the map is not 0: here every voxel)
    n0 = rows["BraTS-GLI-00000-000"]
    e = wrong[0].mean()
    assert float(n0["ece"]) == pytest.approx((1 - e) * 0.05 + e * 0.5, rel=1e-4)
    with (out / "uncertainty_summary.csv").open() as fh:
        summary = {r["figure"]: r for r in csv.DictReader(fh)}
    assert summary["spearman"]["n"] == "4"
    assert (out / "risk_coverage.png").stat().st_size > 5000
    assert "voxel Spearman(uncertainty, error)" in stdout and "ECE" in stdout


def test_predict_then_evaluate_uncertainty(tmp_path, capsys):
    import torch

    from fedbrats.common.config import PRESETS
    from fedbrats.common.inference.modelfile import student_payload
    from fedbrats.common.networks.models import build_network, student_spec
    from fedbrats.common.utils.files import save_atomic
    from fedbrats.simulation.phantoms import write_dataset

    run = PRESETS["tiny"]
    torch.manual_seed(0)
    model = tmp_path / "student.pt"
    save_atomic(model, student_payload(run, build_network(student_spec(run)).state_dict(), 1))
    write_dataset(tmp_path / "data", {"MEN": 3}, shape=(32, 32, 32), seed=4, progress=False)
    preds = tmp_path / "preds"
    assert main(["predict", "--model", str(model), "--input", str(tmp_path / "data" / "MEN"),
                 "--out", str(preds), "--uncertainty", "entropy", "--device", "cpu",
                 "--no-progress"]) == 0
    assert len(list(preds.glob("*_confidence.nii.gz"))) == 3
    capsys.readouterr()
    rc = main(["evaluate", "--pred", str(preds), "--gt", str(tmp_path / "data" / "MEN"),
               "--challenge", "MEN", "--uncertainty", str(preds), "--out",
               str(tmp_path / "eval"), "--no-progress"])
    stdout = capsys.readouterr().out
    assert rc == 0, stdout
    assert "MEN: 3 of 3 paired cases scored" in stdout
    assert "uncertainty (entropy) on 3 case(s)" in stdout
    with (tmp_path / "eval" / "uncertainty_per_case.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert all(0 <= float(r["ece"]) <= 1 and int(r["voxels"]) > 0 for r in rows)


def test_uncertainty_folder_errors(tmp_path, capsys):
    rng = np.random.default_rng(1)
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    _case(gt, pred, "BraTS-GLI-00000-000", rng, True)
    args = ["evaluate", "--pred", str(pred), "--gt", str(gt), "--challenge", "GLI", "--out",
            str(tmp_path / "eval"), "--no-progress", "--uncertainty"]
    assert main([*args, str(tmp_path / "nowhere")]) == 2
    assert "no such folder" in capsys.readouterr().out
    (tmp_path / "empty").mkdir()
    assert main([*args, str(tmp_path / "empty")]) == 2
    assert "no uncertainty map (expected <case>_entropy.nii.gz" in capsys.readouterr().out
    save_nifti(pred / "BraTS-GLI-00000-000_tta_var.nii.gz", np.zeros((20, 20, 20), np.float32))
    assert main([*args, str(pred)]) == 2
    assert "both entropy and tta_var maps" in capsys.readouterr().out
    (pred / "BraTS-GLI-00000-000_tta_var.nii.gz").unlink()
    save_nifti(pred / "BraTS-GLI-00000-000_entropy.nii.gz", np.zeros((20, 20, 19), np.float32))
    assert main([*args, str(pred)]) == 1
    out = capsys.readouterr().out
    assert "uncertainty map" in out and "shape (20, 20, 19), expected the ground truth's" in out
